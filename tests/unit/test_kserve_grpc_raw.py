"""KServe gRPC ModelInfer served on bytes (kserve/grpc.py infer_raw): decoded once in the handler, answered
with the answer's bytes; bad bytes and failures still give their gRPC status with our error details."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from google.rpc import status_pb2
from test_kserve_double import KServeDouble, serve_kserve_grpc
from tritonclient.grpc import service_pb2

from unimodel.core import errors, grpc_decode
from unimodel.gateway.kserve.grpc import Gather
from unimodel.v1 import errors_pb2

INFER = "/inference.GRPCInferenceService/ModelInfer"


class Boom(RuntimeError):
    """A failure that is not one of ours: the caller must get INTERNAL, not the exception's text."""


@pytest.fixture
def gw() -> KServeDouble:
    return KServeDouble()


@pytest.fixture
async def channel(gw: KServeDouble) -> AsyncIterator[grpc.aio.Channel]:
    async with serve_kserve_grpc(gw) as target, grpc.aio.insecure_channel(target) as ch:
        yield ch


def _request() -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="identity", id="r-1")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 3])
    request.raw_input_contents.append(np.arange(6, dtype=np.float32).tobytes())
    return request


def _detail_code(err: grpc.aio.AioRpcError) -> str:
    """The code name in the call's ErrorDetail (grpc-status-details-bin)."""
    raw = dict(err.trailing_metadata() or ())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(raw)
    detail = errors_pb2.ErrorDetail()
    assert status.details[0].Unpack(detail)
    return detail.DESCRIPTOR.fields_by_name["code"].enum_type.values_by_number[detail.code].name


async def test_answer_bytes_are_a_model_infer_response(channel: grpc.aio.Channel) -> None:
    call = channel.unary_unary(INFER)  # no serializers: bytes both ways, as the server sees them
    raw = await call(_request().SerializeToString(), timeout=10)
    reply = service_pb2.ModelInferResponse.FromString(raw)
    assert reply.id == "r-1" and reply.model_name == "identity"
    assert [(o.name, o.datatype, list(o.shape)) for o in reply.outputs] == [("OUTPUT0", "FP32", [2, 3])]
    assert np.frombuffer(reply.raw_output_contents[0], np.float32).tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff", b"\x0a\x05ab"])  # a bad tag; a field longer than the bytes
async def test_undecodable_bytes_are_invalid_argument_with_details(channel: grpc.aio.Channel, garbage: bytes) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await channel.unary_unary(INFER)(garbage, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == grpc_decode.MESSAGE
    assert _detail_code(info.value) == "INVALID_ARGUMENT"


async def test_our_errors_keep_their_status_and_others_are_internal(channel: grpc.aio.Channel, gw: KServeDouble) -> None:
    gw.fail_with = errors.ResourceExhausted("queue full", retry_after_s=1)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await channel.unary_unary(INFER)(_request().SerializeToString(), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and info.value.details() == "queue full"
    assert _detail_code(info.value) == "RESOURCE_EXHAUSTED"

    gw.fail_with = Boom("secret internals")  # not an UnimodelError, on purpose
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await channel.unary_unary(INFER)(_request().SerializeToString(), timeout=10)
    assert info.value.code() == grpc.StatusCode.INTERNAL and info.value.details() == "internal error"


def test_guard_leaves_a_handler_on_bytes_as_it_is() -> None:
    async def behaviour(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    raw = grpc.unary_unary_rpc_method_handler(behaviour)
    assert grpc_decode.guard(raw, ()) is raw
    typed = grpc.unary_unary_rpc_method_handler(behaviour, service_pb2.ModelInferRequest.FromString)
    assert grpc_decode.guard(typed, ()) is not typed


async def test_gather_lets_calls_that_arrive_while_others_wait_go_together() -> None:
    gather = Gather(0.02)
    loop = asyncio.get_running_loop()
    released: list[tuple[int, float]] = []

    async def call(i: int) -> None:
        await gather.hold()
        released.append((i, loop.time()))

    await gather.hold()  # nothing waits: at once
    gather.waiting = 1  # one call is out for its answer
    started = loop.time()
    tasks = [asyncio.create_task(call(i)) for i in range(3)]
    await asyncio.sleep(0.005)
    tasks.append(asyncio.create_task(call(3)))  # a later arrival joins the same group
    await asyncio.gather(*tasks)
    assert sorted(i for i, _t in released) == [0, 1, 2, 3]
    times = [t for _i, t in released]
    assert max(times) - min(times) < 0.005 and min(times) - started >= 0.015  # together, after the window


async def test_gather_survives_a_cancelled_caller() -> None:
    gather = Gather(0.02)
    gather.waiting = 1
    first = asyncio.create_task(gather.hold())
    second = asyncio.create_task(gather.hold())
    await asyncio.sleep(0)
    first.cancel()
    await second  # released by the window, not cancelled with the first
    assert first.cancelled()


async def test_gather_off_or_alone_never_waits() -> None:
    off = Gather(0)
    off.waiting = 5
    await asyncio.wait_for(off.hold(), 0.001)
    alone = Gather(10)
    await asyncio.wait_for(alone.hold(), 0.001)
