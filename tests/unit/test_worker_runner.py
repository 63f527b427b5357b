from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import struct_pb2

from unimodel.core import errors
from unimodel.core.context import now_ms
from unimodel.core.values import from_value, to_value
from unimodel.v1 import inference_pb2
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
    out = await run_batch(engine, batch((1, 0), (2, now_ms() - 5), (3, now_ms() + 60_000)))
    assert engine.seen == [1, 3]
    assert from_value(out[0]) == 2 and from_value(out[2]) == 6
    assert isinstance(out[1], errors.DeadlineExceeded)


async def test_failed_batch_fails_every_item_with_the_cause() -> None:
    out = await run_batch(Failing("f"), batch((1, 0), (2, 0)))
    assert all(isinstance(o, errors.InvalidArgument) and o.message == "bad tensor" for o in out)


async def test_echo_returns_inputs() -> None:
    out = await run_batch(EchoEngine("echo"), batch((4, 0), (5, 0)))
    assert [from_value(o) for o in out] == [4, 5]
