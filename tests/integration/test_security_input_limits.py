"""Issue 15, input limits: the 500s a client's out-of-range integers and deeply nested JSON caused, against
a real gateway, batcher, router and worker (ONNX Runtime on the test repository's `identity` model).

Each test reproduces one finding; every answer must be a 4xx naming the field, quickly, and no service
may log a traceback."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import nats
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from helpers.support import Infra, Services
from unimodel.core import subjects
from unimodel.core.bus import error_from_headers
from unimodel.core.protowire import varint
from unimodel.core.values import to_value
from unimodel.v1 import inference_pb2, services_pb2_grpc

MODEL = "identity"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_repository: Path) -> Iterator[Services]:
    infra = Infra(tmp_path_factory.mktemp("limits"))
    services = Services(infra)
    try:
        infra.start()
        services.start_cluster(workers=1, all_six=False, repository=model_repository, models=MODEL)
        yield services
    finally:
        services.stop()
        infra.stop()
        assert "Traceback" not in infra.sink.getvalue(), "a service logged a traceback"


def _nested_lists(levels: int) -> object:
    value: object = [1.0]
    for _ in range(levels - 1):
        value = [value]
    return value


def _nested_objects(levels: int) -> object:
    value: object = {"a": 1.0}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def _error(r: httpx.Response) -> str:
    return str(r.json())


def test_finding_cache_log_limit_out_of_range_is_a_400(cluster: Services) -> None:
    r = httpx.get(f"{cluster.url}/v1/cache/log", params={"model": MODEL, "limit": 3_000_000_000}, timeout=10)
    assert r.status_code == 400, r.text
    assert "limit" in _error(r) and "10000" in _error(r)


@pytest.mark.parametrize(
    ("field", "value", "bound"),
    [("top_k", 3_000_000_000, "2147483647"), ("seed", 9_223_372_036_854_775_808, "9223372036854775807")],
)
def test_finding_chat_integer_out_of_range_is_a_400(cluster: Services, field: str, value: int, bound: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: value}
    r = httpx.post(f"{cluster.url}/v1/chat/completions", json=body, timeout=10)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and bound in error["message"]


def test_finding_kserve_shape_out_of_range_is_a_400(cluster: Services) -> None:
    tensor = {"name": "INPUT0", "shape": [0, 18446744073709551615], "datatype": "FP32", "data": []}
    r = httpx.post(f"{cluster.url}/v2/models/{MODEL}/infer", json={"inputs": [tensor]}, timeout=10)
    assert r.status_code == 400, r.text
    assert "shape" in r.json()["error"] and "out of range" in r.json()["error"]
    with grpc.insecure_channel(f"127.0.0.1:{cluster.grpc_port}") as channel:
        request = service_pb2.ModelInferRequest(model_name=MODEL)
        request.inputs.add(name="INPUT0", datatype="FP32", shape=[0, 2**63 - 1])
        request.raw_input_contents.append(b"")
        with pytest.raises(grpc.RpcError) as info:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()


@pytest.mark.parametrize("levels", [33, 51, 60])
def test_finding_deep_json_is_a_400_at_the_gateway(cluster: Services, levels: int) -> None:
    for value in (_nested_lists(levels), _nested_objects(levels)):
        r = cluster.predict(value, model=MODEL)
        assert r.status_code == 400, r.text
        assert "nests deeper than 32" in r.json()["error"]["message"]


def test_deep_json_as_deep_as_allowed_reaches_the_worker(cluster: Services) -> None:
    """A number inside 32 nested arrays or objects crosses every hop; the model refuses the shape, not the
    runtime."""
    for value in (_nested_lists(32), _nested_objects(32)):
        r = cluster.predict(value, model=MODEL)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["details"].get("model") == MODEL, r.text


def test_finding_deep_value_over_grpc_is_invalid_argument(cluster: Services) -> None:
    """49 nested lists decode at the gateway (protobuf's 100 levels) but not inside a BatchRequest."""
    with grpc.insecure_channel(f"127.0.0.1:{cluster.grpc_port}") as channel:
        stub = services_pb2_grpc.InferenceServiceStub(channel)
        value = to_value([])
        inner = value
        for _ in range(48):
            inner = inner.list_value.values.add()
            inner.list_value.SetInParent()
        inner.list_value.values.add().number_value = 1
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(inference_pb2.PredictRequest(model=MODEL, input=value), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "nests deeper" in (info.value.details() or "")


def test_finding_deep_json_sent_together_is_answered_quickly(cluster: Services) -> None:
    """Requests sent at once travel in one bundle: each deep one gets its 400 at once, not a 504 after 30 s."""
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        values = [_nested_objects(34) if i % 2 else [[1.0, 2.0, 3.0, 4.0]] for i in range(16)]
        answers = list(pool.map(lambda v: cluster.predict(v, model=MODEL, timeout=30), values))
    assert time.monotonic() - started < 10
    assert [r.status_code for r in answers] == [400 if i % 2 else 200 for i in range(16)], [a.text for a in answers]


async def test_finding_bundle_item_the_batcher_cannot_decode_is_answered(cluster: Services) -> None:
    """An item of a bundle that does not decode (here: nested past protobuf's limit) gets its own error
    reply at its reply_to, and the good item of the same bundle its answer; none is dropped."""
    nc = await nats.connect(cluster.infra.nats.url)
    try:
        # answer inboxes where the batcher's NATS user may publish (subjects.PERMISSIONS)
        bad_inbox, good_inbox = f"{subjects.replies('limits-test')}.1", f"{subjects.replies('limits-test')}.2"
        bad_sub, good_sub = await nc.subscribe(bad_inbox), await nc.subscribe(good_inbox)
        deep = _deep_value_bytes(60)
        bad = inference_pb2.BatchItem(request_id="bad", reply_to=bad_inbox, rows=1).SerializeToString() + b"\x12" + varint(len(deep)) + deep
        good = inference_pb2.BatchItem(
            request_id="good", reply_to=good_inbox, rows=1, input=to_value([[1.0, 2.0, 3.0, 4.0]])
        ).SerializeToString()
        bundle = inference_pb2.EncodedItemBundle(items=[bad, good]).SerializeToString()
        await nc.publish(subjects.bundle(MODEL), bundle, reply=bad_inbox)
        bad_reply = await bad_sub.next_msg(timeout=5)
        err = error_from_headers(bad_reply.headers)
        assert err is not None and err.code_name == "INVALID_ARGUMENT" and "could not be decoded" in err.message
        good_reply = await good_sub.next_msg(timeout=10)
        assert error_from_headers(good_reply.headers) is None
    finally:
        await nc.close()


def _deep_value_bytes(levels: int) -> bytes:
    """An encoded google.protobuf.Value of `levels` nested lists, built by hand (the runtime refuses to
    build one this deep)."""
    data = b"\x11" + b"\x00" * 8  # number_value 0.0
    for _ in range(levels):
        data = b"\x32" + varint(len(b"\x0a" + varint(len(data)) + data)) + b"\x0a" + varint(len(data)) + data
    return data


def test_finding_grpc_request_deeper_than_protobuf_decodes_is_invalid_argument(cluster: Services) -> None:
    """A PredictRequest nested past the runtime's 100 levels: gRPC used to answer UNKNOWN (and log the
    exception); now INVALID_ARGUMENT saying why."""
    deep = _deep_value_bytes(60)
    request = inference_pb2.PredictRequest(model=MODEL).SerializeToString() + b"\x12" + varint(len(deep)) + deep
    with grpc.insecure_channel(f"127.0.0.1:{cluster.grpc_port}") as channel:
        call = channel.unary_unary(
            "/unimodel.v1.InferenceService/Predict",
            request_serializer=lambda raw: raw,
            response_deserializer=inference_pb2.PredictResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "could not be decoded" in (info.value.details() or "")
