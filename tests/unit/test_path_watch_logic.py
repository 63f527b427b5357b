"""PathWatch (which next-hop instance died while work waits on it) and ReplyMux.resend: plain logic."""

from __future__ import annotations

import asyncio

from test_replies import FakeBus, FakeMsg, _sent

from unimodel.core.context import RequestContext
from unimodel.core.path_watch import PathWatch
from unimodel.core.replies import ReplyMux
from unimodel.v1 import inference_pb2


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_probes_only_once_something_stalled_and_reports_each_gone_instance_once() -> None:
    probed: list[str] = []
    answers = {"b1": True, "b2": False, "b3": None}

    async def probe(instance: str) -> bool | None:
        probed.append(instance)
        if instance == "b4":
            raise RuntimeError("NATS hiccup")  # says nothing
        return answers[instance]

    clock = Clock()
    watch = PathWatch(probe, stall_s=1.0, clock=clock)
    assert await watch.check(None, ["b1", "b2"]) == [] and probed == []  # nothing waits
    assert await watch.check(99.5, ["b1", "b2"]) == [] and probed == []  # waited 0.5 s: not stalled
    assert await watch.check(98.0, ["b1", "b2", "b3", "b4"]) == ["b2"]  # alive, gone, unknown, failed probe
    assert sorted(probed) == ["b1", "b2", "b3", "b4"]
    probed.clear()
    assert await watch.check(98.0, ["b1", "b2", "b3"]) == [] and "b2" not in probed  # reported once
    # b2 left the registry and an instance of that name comes back later: watched again
    await watch.check(98.0, ["b1"])
    assert await watch.check(98.0, ["b1", "b2"]) == ["b2"]


async def test_probe_gone_again_sees_a_reconnect_after_a_moment_without_answer() -> None:
    """The router's watch acts on reconnects only: a worker that did not answer while it subscribed again
    after its reconnect is probed again, and its reconnect is then seen."""
    answers: list[bool | float | None] = [False, 0.3]

    async def probe(instance: str) -> bool | float | None:
        return answers.pop(0)

    clock = Clock()
    watch = PathWatch(probe, stall_s=1.0, clock=clock, probe_gone_again=True)
    assert await watch.check(98.0, ["w1"]) == ["w1"] and watch.reconnected == {}  # no answer for now
    assert await watch.check(98.0, ["w1"]) == ["w1"]  # probed again: it answers, reconnected 0.3 s ago
    assert watch.reconnected == {"w1": 99.7}


async def test_resend_sends_the_stalled_requests_again_on_their_inbox_and_the_first_answer_wins() -> None:
    bus = FakeBus()
    mux = ReplyMux(bus, "gw-1")  # type: ignore[arg-type]  # FakeBus stands in for core.bus.Bus
    await mux.start()
    assert mux.oldest_wait() is None
    first = asyncio.create_task(mux.request_item("unimodel.v1.batch.m", inference_pb2.BatchItem(rows=1), RequestContext.new(5), timeout_s=5))
    await _sent(bus, 1)
    oldest = mux.oldest_wait()
    assert oldest is not None
    await asyncio.sleep(0.01)
    second = asyncio.create_task(mux.request_item("unimodel.v1.batch.m", inference_pb2.BatchItem(rows=2), RequestContext.new(5), timeout_s=5))
    await _sent(bus, 2)
    assert mux.oldest_wait() == oldest  # the longest wait
    # only what was sent before the cutoff goes again, alone, to the same inbox, with the same bytes
    assert await mux.resend(before=oldest + 0.005) == 1
    subject, data, reply, _headers = bus.nc.published[-1]
    original = bus.nc.published[0]
    assert (subject, data, reply) == (original[0], original[1], original[2])
    assert await mux.resend(before=oldest + 0.005) == 0  # its send time moved on
    await mux._on_message(FakeMsg(reply, b"answer"))  # type: ignore[arg-type]
    await mux._on_message(FakeMsg(reply, b"a second answer, dropped"))  # type: ignore[arg-type]
    assert await first == b"answer"
    # a request is sent at most max_sends times
    total = 0
    for _ in range(5):
        total += await mux.resend(before=float("inf"), max_sends=3)
    assert total == 2
    second.cancel()
