"""The KServe v2 REST routes and the lean ASGI infer handler, in process over ASGI (no sockets), in front
of the in-memory service double (test_kserve_double.py). Requests are built and answers read with
tritonclient.http's own helpers where it has them."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import AsyncIterator

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as httpclient
from fastapi import FastAPI
from openapi_spec_validator import validate
from starlette.types import Receive, Scope, Send
from test_kserve_double import KServeDouble

from unimodel import __version__
from unimodel.core import errors
from unimodel.core.context import now_ms
from unimodel.gateway.kserve.http import API, infer_asgi, match_infer, register_kserve_routes

FP = np.arange(6, dtype=np.float32).reshape(2, 3)


class FastPath:
    """What the gateway's FastRoutes does for infer: infer_asgi in front of the FastAPI app."""

    def __init__(self, app: FastAPI, gw: KServeDouble) -> None:
        self.app, self.gw = app, gw

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = match_infer(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if found is None:
            await self.app(scope, receive, send)
        else:
            await infer_asgi(self.gw, found[0], found[1], scope, receive, send)  # type: ignore[arg-type]  # KServeDouble has only what the KServe code calls, not every KServePorts member


@pytest.fixture
def gw() -> KServeDouble:
    return KServeDouble()


@pytest.fixture
def api(gw: KServeDouble) -> FastAPI:
    app = FastAPI()
    register_kserve_routes(app, gw)  # type: ignore[arg-type]  # KServeDouble has only what the KServe code calls, not every KServePorts member
    return app


@pytest.fixture(params=["fast", "fastapi"])
async def client(request: pytest.FixtureRequest, api: FastAPI, gw: KServeDouble) -> AsyncIterator[httpx.AsyncClient]:
    """Every test runs against the fast path and against the FastAPI fallback route: same answers."""
    app = FastPath(api, gw) if request.param == "fast" else api
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        yield c


def _body(*inputs: httpclient.InferInput, **kw: object) -> tuple[bytes, dict[str, str]]:
    body, header_length = httpclient.InferenceServerClient.generate_request_body(list(inputs), **kw)
    headers = {} if header_length is None else {"Inference-Header-Content-Length": str(header_length)}
    return body, headers


def _input(name: str, array: np.ndarray, datatype: str, binary: bool = True) -> httpclient.InferInput:
    tensor = httpclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def _result(r: httpx.Response) -> httpclient.InferResult:
    length = r.headers.get("inference-header-content-length")
    return httpclient.InferenceServerClient.parse_response_body(r.content, header_length=int(length) if length else None)


def test_match_infer() -> None:
    assert match_infer("/v2/models/mlp/infer") == ("mlp", "")
    assert match_infer("/v2/models/mlp/versions/3/infer") == ("mlp", "3")
    assert match_infer("/v2/models/org/model/infer") == ("org/model", "")
    assert match_infer("/v2/models/org/model/versions/1/infer") == ("org/model", "1")
    assert match_infer("/v2/models/mlp/ready") is None and match_infer("/v1/models/mlp:predict") is None


# ---- health, metadata, config ------------------------------------------------------------------------


async def test_server_metadata_and_health(client: httpx.AsyncClient, gw: KServeDouble) -> None:
    r = await client.get("/v2")
    assert r.status_code == 200
    assert r.json() == {"name": "unimodel", "version": __version__,
                        "extensions": ["binary_tensor_data", "model_configuration", "schedule_policy", "statistics"]}
    assert (await client.get("/v2/health/live")).json() == {"live": True}
    ready = await client.get("/v2/health/ready")
    assert ready.status_code == 200 and ready.json() == {"ready": True}
    gw.ready_checks["etcd"] = False
    ready = await client.get("/v2/health/ready")
    assert ready.status_code == 400 and ready.json() == {"ready": False}


async def test_model_metadata(client: httpx.AsyncClient) -> None:
    r = await client.get("/v2/models/identity")
    assert r.status_code == 200
    assert r.json() == {
        "name": "identity", "versions": ["1"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, -1]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, -1]}],
    }
    assert (await client.get("/v2/models/identity/versions/1")).json()["name"] == "identity"
    assert (await client.get("/v2/models/multi/versions/3")).json()["inputs"][0] == {"name": "A", "datatype": "INT32", "shape": [2]}
    assert (await client.get("/v2/models/org/model")).json()["name"] == "org/model"
    assert (await client.get("/v2/models/echo")).json()["inputs"] == []  # hosted, not registered
    assert (await client.get("/v2/models/loading")).status_code == 200  # registered: described while it loads


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/v2/models/nope", 404, "model 'nope' not found"),
        ("/v2/models/identity/versions/2", 404, "model 'identity' has no version '2'; it serves version 1"),
        ("/v2/models/bad*name", 400, "invalid model name 'bad*name'"),
        ("/v2/models/nope/config", 404, "model 'nope' not found"),
        ("/v2/models/echo/config", 404, "has no configuration"),
        ("/v2/models/identity/versions/9/config", 404, "no version '9'"),
        ("/v2/models/nope/stats", 404, "model 'nope' not found"),
        ("/v2/models/nope/ready", 404, "model 'nope' not found"),
        ("/v2/models/identity/versions/2/ready", 404, "no version '2'"),
    ],
)
async def test_errors_have_the_kserve_shape(client: httpx.AsyncClient, path: str, status: int, message: str) -> None:
    r = await client.get(path)
    assert r.status_code == status
    assert r.json() == {"error": r.json()["error"]} and message in r.json()["error"]


async def test_model_ready(client: httpx.AsyncClient) -> None:
    r = await client.get("/v2/models/identity/ready")
    assert r.status_code == 200 and r.json() == {"name": "identity", "ready": True}
    assert (await client.get("/v2/models/identity/versions/1/ready")).status_code == 200
    r = await client.get("/v2/models/loading/ready")
    assert r.status_code == 400 and r.json() == {"name": "loading", "ready": False}


async def test_model_config(client: httpx.AsyncClient) -> None:
    r = await client.get("/v2/models/identity/config")
    assert r.status_code == 200
    doc = r.json()
    assert doc["name"] == "identity" and doc["max_batch_size"] == 8 and doc["backend"] == "onnxruntime"
    assert doc["input"][0]["data_type"] == "TYPE_FP32" and doc["input"][0]["dims"] == [-1]
    assert doc["dynamic_batching"]["preferred_batch_size"] == [4, 8]
    assert doc["dynamic_batching"]["max_queue_delay_microseconds"] == 500
    assert doc["dynamic_batching"]["priority_levels"] == 2
    assert (await client.get("/v2/models/multi/versions/3/config")).json()["max_batch_size"] == 0


# ---- infer -----------------------------------------------------------------------------------------------


async def test_infer_binary_round_trip_as_tritonclient_sends_it(client: httpx.AsyncClient, gw: KServeDouble) -> None:
    body, headers = _body(_input("INPUT0", FP, "FP32"), request_id="r-1")
    r = await client.post("/v2/models/identity/infer", content=body, headers={**headers, "x-request-id": "abc"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["x-request-id"] == "abc" and r.headers["x-unimodel-worker"] == "w1"
    result = _result(r)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), FP)
    assert result.get_response()["id"] == "r-1"
    assert result.get_response()["model_name"] == "identity" and result.get_response()["model_version"] == "1"
    (call,) = gw.calls
    # the client's x-request-id is echoed; the request id is the gateway's own (x-unimodel-request-id)
    assert call.api == API and call.ctx.client_request_id == "abc" and call.item.rows == 2
    assert call.ctx.request_id == r.headers["x-unimodel-request-id"] != "abc"


async def test_infer_json_in_json_out(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v2/models/identity/versions/1/infer",
        json={"id": "j", "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2, 3], "data": [[0, 1, 2], [3, 4, 5]]}]},
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"id": "j", "model_name": "identity", "model_version": "1",
                        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [2, 3], "data": [0, 1, 2, 3, 4, 5]}]}


async def test_infer_bytes_and_several_tensors(client: httpx.AsyncClient) -> None:
    text = np.array([["héllo"], ["wörld"]], dtype=np.object_)
    body, headers = _body(_input("TEXT", text, "BYTES"), outputs=[httpclient.InferRequestedOutput("ECHO", binary_data=False)])
    r = await client.post("/v2/models/strings/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"] == [{"name": "ECHO", "datatype": "BYTES", "shape": [2, 1], "data": ["héllo", "wörld"]}]

    a, b = np.array([1, -2], np.int32), np.array([0.5, 2], np.float16)
    body, headers = _body(
        _input("A", a, "INT32", binary=False), _input("B", b, "FP16"),
        outputs=[httpclient.InferRequestedOutput("OUT_B"), httpclient.InferRequestedOutput("OUT_A", binary_data=False)],
    )
    r = await client.post("/v2/models/multi/versions/3/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    result = _result(r)
    np.testing.assert_array_equal(result.as_numpy("OUT_A"), a)
    np.testing.assert_array_equal(result.as_numpy("OUT_B"), b)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["OUT_B", "OUT_A"]


async def test_infer_model_names_with_a_slash(client: httpx.AsyncClient) -> None:
    body, headers = _body(_input("INPUT0", FP, "FP32"))
    r = await client.post("/v2/models/org/model/versions/1/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert _result(r).get_response()["model_name"] == "org/model"


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_infer_compressed_request(client: httpx.AsyncClient, encoding: str) -> None:
    body, headers = _body(_input("INPUT0", FP, "FP32"))
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    r = await client.post("/v2/models/identity/infer", content=packed, headers={**headers, "Content-Encoding": encoding})
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(_result(r).as_numpy("OUTPUT0"), FP)


async def test_infer_timeout_and_priority_parameters_reach_the_service(client: httpx.AsyncClient, gw: KServeDouble) -> None:
    body, headers = _body(_input("INPUT0", FP, "FP32"), timeout=200_000, priority=2)
    before = now_ms()
    r = await client.post("/v2/models/identity/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    (call,) = gw.calls
    assert before + 150 <= call.ctx.deadline_ms <= now_ms() + 200 and call.item.priority == 2


def _fp_input(shape: list[int], datatype: str = "FP32", name: str = "INPUT0") -> dict:
    return {"name": name, "datatype": datatype, "shape": shape, "data": [0.0] * int(np.prod(shape))}


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "needle"),
    [
        ("/v2/models/identity/infer", {"inputs": [_fp_input([1, 2], name="OTHER")]}, {}, 400, "'INPUT0'"),
        ("/v2/models/identity/infer", {"inputs": [_fp_input([2])]}, {}, 400, "input 'INPUT0' of model 'identity': shape [2]"),
        ("/v2/models/identity/infer", {"inputs": [_fp_input([1, 2], "FP64")]}, {}, 400, "datatype FP64, expected FP32"),
        ("/v2/models/identity/infer", {"inputs": [{**_fp_input([1, 3]), "data": [1, 2]}]}, {}, 400,
         "input 'INPUT0': 2 values in data, the shape holds 3"),
        ("/v2/models/identity/infer", b'{"inputs": [', {}, 400, "the body is not valid JSON"),
        ("/v2/models/identity/infer", b'{"inputs": []}', {"Inference-Header-Content-Length": "999"}, 400,
         "Inference-Header-Content-Length 999 is outside"),
        ("/v2/models/identity/infer", b'{"inputs": []}', {"Inference-Header-Content-Length": "ten"}, 400,
         "Inference-Header-Content-Length must be a number"),
        ("/v2/models/identity/infer", {"inputs": [_fp_input([1, 2])], "outputs": [{"name": "NOPE"}]}, {}, 400, "no output 'NOPE'"),
        ("/v2/models/identity/infer", b"\x1f\x8b garbage", {"Content-Encoding": "gzip"}, 400, "malformed gzip body"),
        ("/v2/models/identity/infer", b"{}", {"Content-Encoding": "br"}, 400, "unsupported Content-Encoding"),
        ("/v2/models/identity/versions/4/infer", {"inputs": [_fp_input([1, 2])]}, {}, 404, "has no version '4'"),
        ("/v2/models/nope/infer", {"inputs": [_fp_input([1, 2])]}, {}, 404, "model 'nope' not found"),
        ("/v2/models/loading/infer", {"inputs": [_fp_input([1])]}, {}, 503, "is loading"),
    ],
)
async def test_bad_infer_requests(
    client: httpx.AsyncClient, path: str, body: object, headers: dict[str, str], status: int, needle: str
) -> None:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    r = await client.post(path, content=content, headers=headers)
    assert r.status_code == status, r.text
    message = r.json()["error"]
    assert isinstance(message, str) and needle in message
    if status == 503:
        assert r.headers["retry-after"] == "1"


@pytest.mark.parametrize(
    ("err", "status"),
    [
        (errors.ResourceExhausted("queue of model 'identity' is full", retry_after_s=2.4), 429),
        (errors.Unavailable("no worker", retry_after_s=3), 503),
        (errors.DeadlineExceeded("deadline exceeded"), 504),
    ],
)
async def test_service_errors_keep_status_and_retry_after(
    client: httpx.AsyncClient, gw: KServeDouble, err: errors.UnimodelError, status: int
) -> None:
    gw.fail_with = err
    body, headers = _body(_input("INPUT0", FP, "FP32"))
    r = await client.post("/v2/models/identity/infer", content=body, headers=headers)
    assert r.status_code == status and r.json() == {"error": err.message}
    if err.retry_after_s:
        assert r.headers["retry-after"] == str(round(err.retry_after_s))


async def test_unexpected_service_failure_is_a_plain_500(client: httpx.AsyncClient, gw: KServeDouble) -> None:
    gw.fail_with = RuntimeError("secret detail")  # type: ignore[assignment]  # a non-UnimodelError on purpose: the unexpected failure
    r = await client.post("/v2/models/identity/infer", json={"inputs": [_fp_input([1, 2])]})
    assert r.status_code == 500 and r.json() == {"error": "internal error"}


async def test_body_limit_error_from_receive_is_413_in_kserve_shape(gw: KServeDouble) -> None:
    sent: list[dict] = []

    async def receive() -> dict:
        raise errors.PayloadTooLarge("request body exceeds the limit of 10 bytes")

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v2/models/identity/infer", "headers": []}
    await infer_asgi(gw, "identity", "", scope, receive, send)  # type: ignore[arg-type]  # KServeDouble has only what the KServe code calls, not every KServePorts member; send takes a plain dict
    assert sent[0]["status"] == 413
    assert orjson.loads(sent[1]["body"]) == {"error": "request body exceeds the limit of 10 bytes"}


async def test_decompressed_body_over_the_limit_is_413(client: httpx.AsyncClient, gw: KServeDouble) -> None:
    gw.settings.max_body_bytes = 1000
    r = await client.post("/v2/models/identity/infer", content=gzip.compress(b" " * 5000), headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413 and "once decompressed" in r.json()["error"]


# ---- statistics --------------------------------------------------------------------------------------------


async def test_statistics_count_requests_rows_and_failures(client: httpx.AsyncClient) -> None:
    body, headers = _body(_input("INPUT0", FP, "FP32"))
    for _ in range(3):
        assert (await client.post("/v2/models/identity/infer", content=body, headers=headers)).status_code == 200
    await client.post("/v2/models/identity/infer", json={"inputs": [_fp_input([3])]})  # fails in the service
    r = await client.get("/v2/models/identity/stats")
    assert r.status_code == 200
    (entry,) = r.json()["model_stats"]
    assert entry["name"] == "identity" and entry["version"] == "1"
    assert entry["inference_count"] == 6 and entry["execution_count"] == 3
    assert entry["inference_stats"]["success"]["count"] == 3 and entry["inference_stats"]["success"]["ns"] > 0
    assert entry["inference_stats"]["fail"]["count"] == 1
    assert (await client.get("/v2/models/identity/versions/1/stats")).json()["model_stats"][0]["inference_count"] == 6

    everything = (await client.get("/v2/models/stats")).json()["model_stats"]
    assert [e["name"] for e in everything] == ["identity", "loading", "multi", "org/model", "strings"]
    assert {e["name"]: e["version"] for e in everything}["multi"] == "3"


# ---- OpenAPI ------------------------------------------------------------------------------------------------


async def test_openapi_documents_every_kserve_route(api: FastAPI) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://gw") as c:
        spec = (await c.get("/openapi.json")).json()
    validate(spec)
    paths = spec["paths"]
    for path in ("/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/stats", "/v2/models/{model}",
                 "/v2/models/{model}/versions/{version}", "/v2/models/{model}/ready", "/v2/models/{model}/config",
                 "/v2/models/{model}/stats", "/v2/models/{model}/versions/{version}/stats"):
        assert "get" in paths[path], path
    infer = paths["/v2/models/{model}/infer"]["post"]
    assert "inputs" in infer["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert "application/octet-stream" in infer["requestBody"]["content"]
    assert {"400", "404", "413", "429", "503", "504"} <= set(infer["responses"])
