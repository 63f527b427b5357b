"""The KServe v2 gRPC service (inference.GRPCInferenceService) on a real grpc.aio server bound to a Unix
socket (no network), in front of the in-memory service double, called with tritonclient.grpc.aio."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as grpcclient
from test_kserve_double import KServeDouble, serve_kserve_grpc
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from unimodel.core import errors
from unimodel.gateway.kserve.grpc import API, SERVICE_NAME

FP = np.arange(6, dtype=np.float32).reshape(2, 3)


@pytest.fixture
def gw() -> KServeDouble:
    return KServeDouble()


@pytest.fixture
async def address(gw: KServeDouble) -> AsyncIterator[str]:
    assert SERVICE_NAME == "inference.GRPCInferenceService"
    async with serve_kserve_grpc(gw) as target:
        yield target


@pytest.fixture
async def client(address: str) -> AsyncIterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(address)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def stub(address: str) -> AsyncIterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    async with grpc.aio.insecure_channel(address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _input(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


async def test_health_and_metadata(client: grpcclient.InferenceServerClient, gw: KServeDouble) -> None:
    assert await client.is_server_live() and await client.is_server_ready()
    meta = await client.get_server_metadata(as_json=True)
    assert meta["name"] == "unimodel" and "statistics" in meta["extensions"] and "binary_tensor_data" in meta["extensions"]
    assert await client.is_model_ready("identity") and await client.is_model_ready("identity", "1")
    assert not await client.is_model_ready("identity", "2")
    assert not await client.is_model_ready("loading") and not await client.is_model_ready("nope")
    gw.ready_checks["nats"] = False
    assert not await client.is_server_ready()

    model = await client.get_model_metadata("identity", as_json=True)
    assert model["platform"] == "onnxruntime_onnx" and model["versions"] == ["1"]
    assert model["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": ["-1", "-1"]}]  # int64 as JSON strings
    config = (await client.get_model_config("multi", "3")).config
    assert config.max_batch_size == 0 and config.input[1].data_type == model_config_pb2.TYPE_FP16
    config = (await client.get_model_config("identity")).config
    assert config.dynamic_batching.max_queue_delay_microseconds == 500 and list(config.dynamic_batching.preferred_batch_size) == [4, 8]


@pytest.mark.parametrize(
    ("call", "code", "needle"),
    [
        (lambda c: c.get_model_metadata("nope"), "StatusCode.NOT_FOUND", "model 'nope' not found"),
        (lambda c: c.get_model_metadata("identity", "5"), "StatusCode.NOT_FOUND", "has no version '5'"),
        (lambda c: c.get_model_config("nope"), "StatusCode.NOT_FOUND", "model 'nope' not found"),
        (lambda c: c.get_model_config("bad*"), "StatusCode.INVALID_ARGUMENT", "invalid model name"),
        (lambda c: c.get_inference_statistics("nope"), "StatusCode.NOT_FOUND", "model 'nope' not found"),
        (lambda c: c.get_model_repository_index(), "StatusCode.UNIMPLEMENTED", "model repository"),
        (lambda c: c.get_system_shared_memory_status(), "StatusCode.UNIMPLEMENTED", "shared memory"),
    ],
)
async def test_errors(client: grpcclient.InferenceServerClient, call, code: str, needle: str) -> None:
    with pytest.raises(InferenceServerException) as info:
        await call(client)
    assert info.value.status() == code and needle in info.value.message()


async def test_infer_raw_contents(client: grpcclient.InferenceServerClient, gw: KServeDouble) -> None:
    result = await client.infer(
        "identity", [_input("INPUT0", FP, "FP32")], request_id="g-1", headers={"x-request-id": "rid-9"},
        outputs=[grpcclient.InferRequestedOutput("OUTPUT0")], client_timeout=10,
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), FP)
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("identity", "1", "g-1")
    (call,) = gw.calls
    # the client's x-request-id is kept apart (echoed, logged); the request id is the gateway's own
    assert call.api == API and call.ctx.client_request_id == "rid-9" and call.ctx.request_id != "rid-9" and call.item.rows == 2
    assert 0 < call.ctx.remaining_s() <= 10.5  # the client's deadline (10 s), not the default 30 s

    text = np.array([["héllo".encode()], [b"\x00\xff"]], dtype=np.object_)
    result = await client.infer("strings", [_input("TEXT", text, "BYTES")])
    assert result.as_numpy("ECHO").tolist() == text.tolist()


async def test_infer_typed_contents(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = service_pb2.ModelInferRequest(model_name="identity", model_version="1")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend([1.5, 2.5, -1])
    reply = await stub.ModelInfer(request, timeout=10)
    assert np.frombuffer(reply.raw_output_contents[0], np.float32).tolist() == [1.5, 2.5, -1]
    assert list(reply.outputs[0].shape) == [1, 3]


@pytest.mark.parametrize(
    ("model", "inputs", "code", "needle"),
    [
        ("identity", [("INPUT0", np.ones(3, np.float32), "FP32")], "StatusCode.INVALID_ARGUMENT", "input 'INPUT0' of model 'identity': shape [3]"),
        ("identity", [("INPUT0", np.ones((1, 3), np.float64), "FP64")], "StatusCode.INVALID_ARGUMENT", "datatype FP64, expected FP32"),
        ("identity", [("OTHER", np.ones((1, 3), np.float32), "FP32")], "StatusCode.INVALID_ARGUMENT", "'INPUT0'"),
        ("nope", [("INPUT0", np.ones((1, 3), np.float32), "FP32")], "StatusCode.NOT_FOUND", "model 'nope' not found"),
        ("loading", [("INPUT0", np.ones((1, 1), np.float32), "FP32")], "StatusCode.UNAVAILABLE", "is loading"),
    ],
)
async def test_bad_infer_requests(
    client: grpcclient.InferenceServerClient, model: str, inputs: list, code: str, needle: str
) -> None:
    with pytest.raises(InferenceServerException) as info:
        await client.infer(model, [_input(*spec) for spec in inputs])
    assert info.value.status() == code and needle in info.value.message()


async def test_bad_raw_size_names_the_tensor(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    request = service_pb2.ModelInferRequest(model_name="identity")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 3])
    request.raw_input_contents.append(b"\0" * 8)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'INPUT0': 8 bytes of data for shape [1, 3] FP32 (12 bytes expected)" in (info.value.details() or "")


async def test_service_errors_map_to_grpc_status(client: grpcclient.InferenceServerClient, gw: KServeDouble) -> None:
    gw.fail_with = errors.ResourceExhausted("queue full", retry_after_s=1)
    with pytest.raises(InferenceServerException) as info:
        await client.infer("identity", [_input("INPUT0", FP, "FP32")])
    assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED" and info.value.message() == "queue full"


async def test_statistics(client: grpcclient.InferenceServerClient) -> None:
    for _ in range(2):
        await client.infer("identity", [_input("INPUT0", FP, "FP32")])
    stats = await client.get_inference_statistics("identity", as_json=True)
    (entry,) = stats["model_stats"]
    assert entry["name"] == "identity" and entry["version"] == "1"
    assert entry["inference_count"] == "4" and entry["execution_count"] == "2"  # uint64 as JSON strings
    assert entry["inference_stats"]["success"]["count"] == "2"
    everything = await client.get_inference_statistics()
    assert [s.name for s in everything.model_stats] == ["identity", "loading", "multi", "org/model", "strings"]
