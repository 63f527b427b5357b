"""Restarts for the local cluster's children, as compose's `restart: unless-stopped` does for containers.

`RestartPolicy` is the plain rule (no processes, time injected): a child that exits on its own is
started again after an exponential backoff (0.5 s, 1 s, 2 s, ... capped at 10 s; back to 0.5 s once it
has run for a minute), and the cluster gives up on it when it failed `max_failures` times within
`window_s`, or at once when it exited with code 2 (a bad setting: starting it again cannot help).
`Supervisor` applies the rule to ManagedProcess objects; `unimodel up` polls it. A child that exited takes
the rest of its process group with it (SIGKILL), so nothing it spawned outlives it.
"""

from __future__ import annotations

import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from unimodel.local.procs import ManagedProcess

CONFIG_ERROR_EXIT = 2
"""Exit code of a service that refused its settings (core.settings): fatal, never restarted."""


def _why(code: int, lines: list[str]) -> str:
    """How a child ended, in words: the signal that killed it, or its exit code and last log line."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    last = next((line.strip() for line in reversed(lines) if line.strip()), "")
    return f"exited with code {code}" + (f" ({last[:300]})" if last else "")


class GiveUp(Exception):
    """A child failed too often (or fatally); the message says which and why, in one line."""


@dataclass
class RestartPolicy:
    base_delay_s: float = 0.5
    max_delay_s: float = 10.0
    window_s: float = 60.0
    max_failures: int = 5
    stable_after_s: float = 60.0  # a run this long resets the backoff

    def delay(self, consecutive: int) -> float:
        """Backoff before restart number `consecutive` (1 = the first after a stable run)."""
        return min(self.max_delay_s, self.base_delay_s * 2 ** max(0, consecutive - 1))


@dataclass
class _Child:
    proc: ManagedProcess
    started_at: float
    failures: deque[float] = field(default_factory=deque)  # exit times within the window
    consecutive: int = 0
    restart_at: float | None = None  # set while it waits for its restart
    restarts: int = 0


class Supervisor:
    """Watches children; `poll()` restarts those that exited, or raises GiveUp."""

    def __init__(
        self,
        policy: RestartPolicy | None = None,
        say: Callable[[str], None] = print,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy or RestartPolicy()
        self.say = say
        self.clock = clock
        self._children: list[_Child] = []

    def watch(self, proc: ManagedProcess) -> None:
        self._children.append(_Child(proc, self.clock()))

    def restarts(self, name: str) -> int:
        return sum(c.restarts for c in self._children if c.proc.name == name)

    def poll(self) -> None:
        now = self.clock()
        p = self.policy
        for child in self._children:
            proc = child.proc
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.restart_at = None
                    child.restarts += 1
                    child.started_at = now
                    proc.restart()
                continue
            code = proc.returncode()
            if proc.proc is None or code is None:
                continue
            proc.reap_group()  # what it spawned goes with it
            why = _why(code, proc.lines)
            if code == CONFIG_ERROR_EXIT:  # core.settings printed the bad setting as the last line
                raise GiveUp(f"{proc.name} {why}: a bad setting, not restarted")
            if now - child.started_at >= p.stable_after_s:
                child.consecutive = 0
            child.consecutive += 1
            child.failures.append(now)
            while child.failures and now - child.failures[0] > p.window_s:
                child.failures.popleft()
            if len(child.failures) >= p.max_failures:
                raise GiveUp(f"{proc.name} failed {len(child.failures)} times within {p.window_s:.0f}s; last {why}")
            delay = p.delay(child.consecutive)
            child.restart_at = now + delay
            self.say(f"unimodel up: {proc.name} {why}; restarting in {delay:.1f}s")
