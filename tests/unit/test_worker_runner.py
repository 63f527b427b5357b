from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import struct_pb2

from unimodel.core import errors
from unimodel.core.context import now_ms
from unimodel.core.values import from_value, to_value
from unimodel.v1 import errors_pb2, inference_pb2
from unimodel.worker.engines import EchoEngine, Engine
from unimodel.worker.runner import run_batch


class Recording(Engine):
    def __init__(self) -> None:
        super().__init__("rec")
        self.seen: list[object] = []

    async def infer(self, inputs: Sequence[struct_pb2.Value]) -> list[struct_pb2.Value]:
        self.seen.extend(from_value(v) for v in inputs)
        return [to_value(from_value(v) * 2) for v in inputs]


class Failing(Engine):
    async def infer(self, inputs: Sequence[struct_pb2.Value]) -> list[struct_pb2.Value]:
        raise errors.InvalidArgument("bad tensor")


def batch(*items: tuple[int, int]) -> inference_pb2.BatchRequest:
    b = inference_pb2.BatchRequest(batch_id="b1", model="m", path=["batcher-1", "router-1"])
    for value, deadline in items:
        b.items.add(request_id=f"r{value}", input=to_value(value), deadline_unix_ms=deadline)
    return b


async def test_expired_items_are_answered_not_executed() -> None:
    engine = Recording()
    resp = await run_batch(engine, batch((1, 0), (2, now_ms() - 5), (3, now_ms() + 60_000)), "w1")
    assert engine.seen == [1, 3]
    assert [r.WhichOneof("result") for r in resp.results] == ["output", "error", "output"]
    assert resp.results[1].error.code == errors_pb2.DEADLINE_EXCEEDED
    assert from_value(resp.results[2].output) == 6
    assert list(resp.path) == ["batcher-1", "router-1", "w1"]


async def test_failed_batch_fails_every_item_with_the_cause() -> None:
    resp = await run_batch(Failing("f"), batch((1, 0), (2, 0)), "w1")
    assert all(r.error.code == errors_pb2.INVALID_ARGUMENT and r.error.message == "bad tensor" for r in resp.results)


async def test_echo_returns_inputs() -> None:
    resp = await run_batch(EchoEngine("echo"), batch((4, 0), (5, 0)), "w1")
    assert [from_value(r.output) for r in resp.results] == [4, 5]
