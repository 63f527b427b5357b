"""`unimodel up`'s restart rule (local/supervisor.py) on real child processes, with the clock injected."""

from __future__ import annotations

import io
import os
import sys
import time

import pytest

from helpers.process_tree import alive
from unimodel.local.procs import ManagedProcess
from unimodel.local.supervisor import GiveUp, RestartPolicy, Supervisor


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def child(code: int, name: str = "svc") -> ManagedProcess:
    proc = ManagedProcess(name, [sys.executable, "-c", f"print('boom'); raise SystemExit({code})"], sink=io.StringIO())
    proc.start()
    assert proc.wait(30) == code
    return proc


def test_backoff_doubles_up_to_the_cap() -> None:
    policy = RestartPolicy(base_delay_s=0.5, max_delay_s=10)
    assert [policy.delay(n) for n in range(1, 8)] == [0.5, 1, 2, 4, 8, 10, 10]


def test_an_exited_child_is_restarted_after_its_backoff_and_logged() -> None:
    clock, said = Clock(), []
    sup = Supervisor(RestartPolicy(), say=said.append, clock=clock)
    proc = child(1)
    first_pid = proc.pid
    sup.watch(proc)
    sup.poll()
    assert said == ["unimodel up: svc exited with code 1 (boom); restarting in 0.5s"]
    sup.poll()  # still waiting for its backoff
    assert proc.pid == first_pid and sup.restarts("svc") == 0
    clock.now += 0.5
    sup.poll()
    assert proc.pid != first_pid and sup.restarts("svc") == 1
    assert proc.wait(30) == 1
    clock.now += 1
    sup.poll()
    assert said[-1].endswith("restarting in 1.0s")  # the second failure in a row waits longer
    proc.stop()


def test_a_long_run_resets_the_backoff() -> None:
    clock, said = Clock(), []
    sup = Supervisor(RestartPolicy(stable_after_s=60, window_s=30), say=said.append, clock=clock)
    proc = child(1)
    sup.watch(proc)
    sup.poll()
    clock.now += 0.5
    sup.poll()  # restarted
    proc.wait(30)
    clock.now += 120  # it ran a long time before it exited
    sup.poll()
    assert said[-1].endswith("restarting in 0.5s")
    proc.stop()


def test_repeated_failures_within_the_window_give_up_naming_the_child() -> None:
    clock = Clock()
    sup = Supervisor(RestartPolicy(max_failures=3, window_s=60), say=lambda _: None, clock=clock)
    proc = child(3, "gpu-worker-1")
    sup.watch(proc)
    with pytest.raises(GiveUp, match=r"gpu-worker-1 failed 3 times within 60s; last exited with code 3 \(boom\)"):
        for _ in range(10):
            sup.poll()
            clock.now += 11
            sup.poll()
            proc.wait(30)
    proc.stop()


def test_a_settings_error_is_not_restarted() -> None:
    sup = Supervisor(say=lambda _: None, clock=Clock())
    proc = child(2, "gateway")
    sup.watch(proc)
    with pytest.raises(GiveUp, match="gateway exited with code 2 .*a bad setting, not restarted"):
        sup.poll()
    proc.stop()


def test_a_killed_child_is_named_by_its_signal() -> None:
    clock, said = Clock(), []
    sup = Supervisor(say=said.append, clock=clock)
    proc = ManagedProcess("gpu-worker-0", [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
                          sink=io.StringIO())
    proc.start()
    proc.wait(30)
    sup.watch(proc)
    sup.poll()
    assert said == ["unimodel up: gpu-worker-0 was killed by SIGKILL; restarting in 0.5s"]
    proc.stop()


def test_what_a_dead_child_spawned_goes_with_it() -> None:
    """A grandchild that does not watch its parent (vLLM's EngineCore) is killed with its process group."""
    sup = Supervisor(say=lambda _: None, clock=Clock())
    script = "import subprocess, sys; p = subprocess.Popen(['sleep', '60']); print(p.pid, flush=True); sys.exit(1)"
    proc = ManagedProcess("parent", [sys.executable, "-c", script], sink=io.StringIO())
    proc.start()
    assert proc.wait(30) == 1
    grandchild = int(proc.lines[0])
    assert os.path.exists(f"/proc/{grandchild}")
    sup.watch(proc)
    sup.poll()
    deadline = time.monotonic() + 5
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild)
    proc.stop()

