"""The gateway's running generations by worker (gateway/stream_watch.py): which workers to probe, and
ending the generations of a lost one."""

from __future__ import annotations

from dataclasses import dataclass, field

from unimodel.gateway.stream_watch import StreamWatch


@dataclass(eq=False)
class Gen:
    worker_id: str
    last_seen: float
    ended: list[str] = field(default_factory=list)

    def worker_lost(self, reason: str) -> None:
        self.ended.append(reason)


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def test_only_workers_whose_generations_all_fell_silent_are_probed() -> None:
    clock = Clock()
    watch = StreamWatch(silence_s=1.0, clock=clock)
    a1, a2, b = Gen("a", 98.0), Gen("a", 99.5), Gen("b", 98.5)
    for g in (a1, a2, b):
        watch.add(g)
    assert len(watch) == 3 and sorted(watch.workers()) == ["a", "b"]
    assert watch.silent_workers() == ["b"]  # a2 heard from its worker 0.5 s ago
    clock.now = 101.0
    assert sorted(watch.silent_workers()) == ["a", "b"]


def test_a_lost_worker_ends_each_of_its_generations_once() -> None:
    watch = StreamWatch()
    a1, a2, b = Gen("a", 0), Gen("a", 0), Gen("b", 0)
    for g in (a1, a2, b):
        watch.add(g)
    assert watch.lost("a", "worker a is gone") == 2
    assert a1.ended == a2.ended == ["worker a is gone"] and b.ended == []
    assert watch.lost("a", "again") == 0 and watch.workers() == ["b"]


def test_finished_generations_leave_the_watch() -> None:
    watch = StreamWatch()
    g = Gen("a", 0)
    watch.add(g)
    watch.discard(g)
    watch.discard(g)  # idempotent
    watch.add(Gen("", 0))  # not accepted by a worker yet: nothing to watch
    assert len(watch) == 0 and watch.workers() == []
