"""Which instance of the next hop died while this process waits on work it handed over.

Core NATS does not redeliver. A gateway hands each request to a batcher (a queue group: it cannot know
which one took it) and waits for the answer; a batcher hands each batch to a router and waits for its
ack. If that batcher or router is killed, the work it held is gone and the waiter would wait until the
request's deadline. So, while something has waited longer than `stall_s`, the owner asks each registered
instance of the next hop whether its process is still connected (subjects.alive: NATS answers "no
responders" at once for a process whose connection closed, kill -9 included; an instance that answers,
or is only slow to, is alive). Each instance found gone is reported once; the owner then sends again
what it was waiting for (inference is idempotent: the first answer wins, later ones are dropped).

With a NATS cluster, a node's death loses what was passing through it while its clients move to another
node and stay alive: an instance answers the probe with the seconds since it reconnected (Bus.alive), and
one that reconnected after the oldest wait began is reported too, once per reconnect, so that the owner
sends again what it waits for as it does for a gone one.

Plain logic: the probe is injected and the clock too.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterable

Probe = Callable[[str], Awaitable[bool | float | None]]
"""Whether an instance is connected: True (it answered), a float (it answered, and reconnected to NATS that many
seconds ago), False (NATS: no responders), None (unknown)."""

RECONNECT_SLACK_S = 0.5
"""Two reconnect times of one instance closer than this are the same reconnect seen by two probes."""


class PathWatch:
    def __init__(
        self, probe: Probe, stall_s: float = 1.0, clock: Callable[[], float] = time.monotonic, *, probe_gone_again: bool = False
    ) -> None:
        self.probe = probe
        self.stall_s = stall_s
        self.clock = clock
        # True: an instance found gone is probed again at the next check (and reported again while it does not
        # answer), for an owner that acts only on reconnects: one that did not answer for a moment (it was
        # subscribing again after its reconnect) is then seen answering with its reconnect
        self.probe_gone_again = probe_gone_again
        self._gone: set[str] = set()  # reported already; forgotten once they leave the registry
        self._reconnects: dict[str, float] = {}  # instance -> clock time of the reconnect reported last
        self.reconnected: dict[str, float] = {}  # of the last check: instance -> clock time of its reported reconnect

    async def check(self, waiting_since: float | None, instances: Iterable[str]) -> list[str]:
        """The instances among `instances` (the registered ones of the next hop) found gone since the
        last check, when something has waited since `waiting_since` (clock time) for longer than
        `stall_s`, followed by those that reconnected to NATS after `waiting_since` (also in
        `reconnected`); [] otherwise, without probing. A probe that raises says nothing."""
        registered = set(instances)
        self._gone &= registered
        self._reconnects = {i: t for i, t in self._reconnects.items() if i in registered}
        self.reconnected = {}
        if waiting_since is None or self.clock() - waiting_since < self.stall_s:
            return []
        ids = sorted(registered - self._gone)
        answers = await asyncio.gather(*(self.probe(i) for i in ids), return_exceptions=True)
        gone = [i for i, answer in zip(ids, answers, strict=True) if answer is False]
        if not self.probe_gone_again:
            self._gone.update(gone)
        now = self.clock()
        for i, answer in zip(ids, answers, strict=True):
            if isinstance(answer, float):  # reconnected `answer` seconds ago
                at = now - answer
                if at > waiting_since and at - self._reconnects.get(i, -math.inf) > RECONNECT_SLACK_S:
                    self._reconnects[i] = self.reconnected[i] = at
        return gone + list(self.reconnected)


STALL_S = 1.0
"""Probe the next hop once something has waited this long for it."""
INTERVAL_S = 0.5
"""How often the owner checks (core/replies.py's oldest wait, the batcher's oldest ack)."""
PROBE_TIMEOUT_S = 1.0
