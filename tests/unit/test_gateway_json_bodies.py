"""One body rule on every gateway route that takes JSON: a body that parses as JSON is JSON whatever its
Content-Type says (curl -d labels it application/x-www-form-urlencoded), and one that does not parse is
a 400 saying so, in the route family's error shape. In process over ASGI (no sockets): etcd is an
in-memory store and the cluster behind the gateway is a fake that answers like an echo worker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as httpclient
from fastapi.routing import APIRoute

from unimodel.core import modelconfig
from unimodel.core.context import RequestContext
from unimodel.core.store import KeyValueStore, WatchEvent
from unimodel.gateway.service import GatewayService
from unimodel.gateway.settings import GatewaySettings
from unimodel.v1 import inference_pb2, registry_pb2

FORM = {"content-type": "application/x-www-form-urlencoded"}  # what curl -d sends
LABELS = [FORM, {"content-type": "text/plain"}, {"content-type": "application/json"}, {}]


class MemoryStore(KeyValueStore):
    """etcd's part in registration: keeps what is put."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    async def grant_lease(self, ttl_s: int) -> int:
        return 1

    async def refresh_lease(self, lease_id: int) -> int:
        return 1

    async def revoke_lease(self, lease_id: int) -> None:
        return None

    async def put(self, key: bytes, value: bytes, lease_id: int | None = None) -> None:
        self.data[key] = value

    async def delete(self, key: bytes) -> None:
        self.data.pop(key, None)

    async def get_prefix(self, prefix: bytes) -> tuple[dict[bytes, bytes], int]:
        return {k: v for k, v in self.data.items() if k.startswith(prefix)}, 1

    def watch_prefix(self, prefix: bytes, start_revision: int) -> AsyncIterator[WatchEvent]:
        raise NotImplementedError("the gateway under test watches nothing")

    async def close(self) -> None:
        return None


class EchoCluster:
    """Stands in for batcher, router and worker behind the gateway's ReplyMux: answers every item as
    an echo worker does (predict: the input; infer: each input tensor as an output)."""

    async def request_item(
        self, subject: str, item: inference_pb2.BatchItem, ctx: RequestContext, *, timeout_s: float, bundle_subject: str = "",
        local_answer: bool = False,  # answers here are small: always bytes, as ReplyMux gives them
    ) -> bytes:
        model = subject.rsplit(".", 1)[-1]
        if item.HasField("input"):
            return inference_pb2.PredictResponse(model=model, output=item.input, worker_id="w1").SerializeToString()
        reply = inference_pb2.InferResponse(model=model, id=item.id, worker_id="w1")
        for tensor in item.inputs:
            out = reply.outputs.add()
            out.CopyFrom(tensor)
            out.name = "OUTPUT0"
        return reply.SerializeToString()


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    config = modelconfig.parse({
        "name": "m", "engine": "delay", "max_batch_size": 8,
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}],
    })
    modelconfig.write(tmp_path / "m", config)
    return tmp_path


@pytest.fixture
async def gateway(repository: Path) -> AsyncIterator[GatewayService]:
    gw = GatewayService(GatewaySettings(max_body_bytes=1 << 16, model_repository=str(repository)), store=MemoryStore())
    gw.instances.apply(  # one worker hosting echo, as discovery applies it from etcd
        "/unimodel/v1/instances/gpu-worker/w1", registry_pb2.InstanceInfo(id="w1", kind="gpu-worker", models=["echo"])
    )
    gw.instances.synced.set()
    gw.registered.synced.set()
    gw.replies = EchoCluster()  # type: ignore[assignment]  # EchoCluster stands in for the ReplyMux (answers every item with its input)
    yield gw


@pytest.fixture
async def client(gateway: GatewayService) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app), base_url="http://gw") as c:
        yield c


CHAT = [{"role": "user", "content": "hi"}]

# (path, body, status, what the answer holds): the outcome a JSON-labelled body gets, on every route
OUTCOMES = [
    ("/v1/models", {"name": "m", "config": {"max_batch_size": 4}}, 202, {"name": "m", "state": "LOADING", "registered": True}),
    ("/v1/models", {"name": "m", "bogus": 1}, 400, {"error": {"code": "INVALID_ARGUMENT"}}),
    ("/v1/models/echo:predict", {"input": {"text": "hello", "values": [1, 2]}}, 200,
     {"model": "echo", "output": {"text": "hello", "values": [1, 2]}}),
    ("/v1/models/echo:predict", {"input": 1, "extra": 2}, 400, {"error": {"code": "INVALID_ARGUMENT"}}),
    ("/v1/chat/completions", {"model": "nope", "messages": CHAT}, 404, {"error": {"code": "model_not_found"}}),
    ("/v1/chat/completions", {"model": "echo", "messages": []}, 400, {"error": {"param": "messages"}}),
    ("/v1/chat/completions", {"model": "echo", "messages": [{"role": "user", "content": 3}]}, 400,
     {"error": {"param": "messages[0].content", "message": "messages[0].content: must be a string or a list of text parts"}}),
    ("/v1/completions", {"model": "echo", "prompt": ""}, 400, {"error": {"param": "prompt"}}),
    ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, {"error": {"code": "model_not_found"}}),
    ("/v1/embeddings", {"model": "echo", "input": []}, 400, {"error": {"param": "input"}}),
    ("/v1/embeddings", {"model": "nope", "input": "hi"}, 404, {"error": {"code": "model_not_found"}}),
    ("/v2/models/echo/infer", {"id": "r1", "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]},
     200, {"id": "r1", "model_name": "echo", "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0]}]}),
    ("/v2/models/echo/versions/1/infer", {"inputs": []}, 400, {"error": "inputs must be a non-empty list of tensors"}),
    ("/modelcache", {"type": "register", "scope": {"model": "m"}}, 200, {"errorCode": 0, "response": "create_success"}),
    ("/modelcache", {"type": "drop", "scope": {"model": "m"}}, 400, {"errorCode": 103}),
]


def _holds(doc: object, expected: object) -> bool:
    if isinstance(expected, dict):
        return isinstance(doc, dict) and all(k in doc and _holds(doc[k], v) for k, v in expected.items())
    if isinstance(expected, list):
        return isinstance(doc, list) and len(doc) == len(expected) and all(map(_holds, doc, expected))
    return doc == expected


@pytest.mark.parametrize("label", LABELS, ids=["form", "text", "json", "none"])
@pytest.mark.parametrize(("path", "body", "status", "expected"), OUTCOMES, ids=[f"{o[0]}-{o[2]}" for o in OUTCOMES])
async def test_a_json_body_is_json_whatever_its_content_type(
    client: httpx.AsyncClient, label: dict[str, str], path: str, body: dict, status: int, expected: dict
) -> None:
    r = await client.post(path, content=orjson.dumps(body), headers=label)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert _holds(r.json(), expected), r.text


def _not_json_unimodel(doc: dict) -> str:
    assert doc["error"]["code"] == "INVALID_ARGUMENT"
    return doc["error"]["message"]


def _not_json_openai(doc: dict) -> str:
    assert doc["error"]["type"] == "invalid_request_error" and doc["error"]["code"] == "invalid_argument"
    return doc["error"]["message"]


def _not_json_triton(doc: dict) -> str:
    assert set(doc) == {"error"} and isinstance(doc["error"], str)
    return doc["error"]


def _not_json_modelcache(doc: dict) -> str:
    assert doc["errorCode"] == 103
    return doc["errorDesc"]


NOT_JSON_ROUTES = [
    ("/v1/models", _not_json_unimodel),
    ("/v1/models/echo:predict", _not_json_unimodel),
    ("/v1/chat/completions", _not_json_openai),
    ("/v1/completions", _not_json_openai),
    ("/v1/embeddings", _not_json_openai),
    ("/v2/models/echo/infer", _not_json_triton),
    ("/v2/models/echo/versions/1/infer", _not_json_triton),
    ("/modelcache", _not_json_modelcache),
]


@pytest.mark.parametrize("raw", [b"name=m&path=mlp", b'{"name": ', b"", b"\xff\xfe{}"], ids=["form", "cut", "empty", "bytes"])
@pytest.mark.parametrize(("path", "message_of"), NOT_JSON_ROUTES, ids=[p for p, _ in NOT_JSON_ROUTES])
async def test_a_body_that_is_not_json_is_a_400_in_the_family_shape(
    client: httpx.AsyncClient, path: str, message_of, raw: bytes
) -> None:
    for label in (FORM, {"content-type": "application/json"}):
        r = await client.post(path, content=raw, headers=label)
        assert r.status_code == 400, r.text
        assert r.headers["content-type"] == "application/json"
        assert "is not valid JSON" in message_of(r.json())
        assert "Traceback" not in r.text


async def test_registration_by_curl_d_stores_the_model(gateway: GatewayService, client: httpx.AsyncClient) -> None:
    # exactly what README's `curl -s -X POST localhost:8000/v1/models -d '{...}'` sends
    r = await client.post("/v1/models", content=b'{"name": "m", "config": {"max_batch_size": 4}}', headers=FORM)
    assert r.status_code == 202, r.text
    assert gateway.configs()["m"].max_batch_size == 4 and gateway.configs()["m"].engine == "delay"
    assert r.json()["config"]["max_batch_size"] == 4


async def test_binary_tensors_still_use_the_inference_header(client: httpx.AsyncClient) -> None:
    """Triton's binary extension: the JSON header's length in Inference-Header-Content-Length, the raw
    tensor bytes after it, and binary outputs back the same way."""
    tensor = httpclient.InferInput("INPUT0", [2, 3], "FP32")
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensor.set_data_from_numpy(data, binary_data=True)
    output = httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)
    body, header_length = httpclient.InferenceServerClient.generate_request_body([tensor], outputs=[output])
    for label in ({"content-type": "application/octet-stream"}, FORM):
        r = await client.post(
            "/v2/models/echo/infer", content=body, headers={**label, "Inference-Header-Content-Length": str(header_length)}
        )
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/octet-stream"
        result = httpclient.InferenceServerClient.parse_response_body(
            r.content, header_length=int(r.headers["inference-header-content-length"])
        )
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)


async def test_no_route_takes_a_fastapi_body_parameter(gateway: GatewayService) -> None:
    """FastAPI's body parameters refuse JSON labelled with another Content-Type: every body goes through
    json_body instead, and is documented in OpenAPI as JSON."""
    spec = gateway.api.openapi()
    for route in gateway.api.routes:
        if not isinstance(route, APIRoute):
            continue
        assert route.body_field is None, f"{route.path} declares a FastAPI body parameter"
        if "POST" in route.methods:
            body = spec["paths"][route.path_format]["post"]["requestBody"]
            if route.path_format.startswith("/v1/audio/"):  # file uploads: multipart, read by the route itself
                assert set(body["content"]) == {"multipart/form-data"}
                continue
            assert "application/json" in body["content"] and "whatever the Content-Type" in body["description"]
    registered = spec["paths"]["/v1/models"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(registered["properties"]) == {"name", "path", "config"}
