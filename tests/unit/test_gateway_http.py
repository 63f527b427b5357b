"""The gateway's REST surface, in process over ASGI (no sockets): routes, OpenAPI, bad input."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from openapi_spec_validator import validate
from starlette.routing import Route

from unimodel.core import modelconfig
from unimodel.gateway.service import GatewayService
from unimodel.gateway.settings import GatewaySettings
from unimodel.v1 import registry_pb2


@pytest.fixture
async def gateway() -> AsyncIterator[GatewayService]:
    gw = GatewayService(GatewaySettings(max_body_bytes=2048))
    # The cluster view as discovery would fill it from etcd: one worker hosting echo, as a worker registers.
    echo = registry_pb2.ModelStatus(name="echo", state=registry_pb2.ModelStatus.READY, pinned=True, engine="echo")
    gw.instances.apply(  # as discovery applies a watch event from etcd
        "/unimodel/v1/instances/gpu-worker/w1",
        registry_pb2.InstanceInfo(id="w1", kind="gpu-worker", models=["echo"], model_states=[echo]),
    )
    gw.instances.synced.set()
    gw.registered.synced.set()
    yield gw


@pytest.fixture
async def client(gateway: GatewayService) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=gateway.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        yield c


async def test_openapi_lists_every_route_and_validates(gateway: GatewayService, client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    validate(spec)
    documented = {(path, method.upper()) for path, ops in spec["paths"].items() for method in ops}
    for route in gateway.api.routes:
        if not isinstance(route, Route) or route.path in ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"):
            continue
        for method in route.methods - {"HEAD"}:
            assert (route.path_format, method) in documented, f"{method} {route.path_format} missing from OpenAPI"
    body = spec["paths"]["/v1/models/{name}:predict"]["post"]["requestBody"]
    assert "input" in body["content"]["application/json"]["schema"]["properties"]


async def test_models_lists_echo(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models")
    assert r.status_code == 200
    (card,) = r.json()["data"]
    assert card.pop("created") > 1_700_000_000  # OpenAI's field: when the gateway first saw the model
    assert card == {
        "id": "echo", "object": "model", "owned_by": "unimodel", "ready": True, "state": "READY", "instances": 1,
        "engine": "echo", "generative": False,
    }


async def test_models_show_a_registered_models_config_engine(gateway: GatewayService, client: httpx.AsyncClient) -> None:
    config = modelconfig.parse({
        "name": "tiny-llm", "engine": "llamacpp", "path": "/models/tiny-llm", "max_batch_size": 1,
    })
    gateway.registered.apply("/unimodel/v1/models/tiny-llm", config)  # registered, on no worker yet
    cards = {c["id"]: c for c in (await client.get("/v1/models")).json()["data"]}
    assert cards["echo"]["engine"] == "echo"
    tiny = cards["tiny-llm"]
    assert tiny["engine"] == "llamacpp" and tiny["state"] == "LOADING" and not tiny["ready"] and tiny["generative"]


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v1/models/echo:predict", b'{"input": ', 400, "the body is not valid JSON"),
        ("/v1/models/echo:predict", b"[1, 2]", 400, "JSON object"),
        ("/v1/models/echo:predict", b"{}", 400, "input is required"),
        ("/v1/models/echo:predict", b'{"input": 1, "extra": 2}', 400, "unknown field"),
        ("/v1/models/echo:predict", b'{"input": 1, "parameters": {"a": 1}}', 400, "parameters"),
        ("/v1/models/no-such:predict", b'{"input": 1}', 404, "not found"),
        ("/v1/models/bad*name:predict", b'{"input": 1}', 400, "invalid model name"),
        ("/v1/models/llama-3.1:predict", b'{"input": 1}', 404, "not found"),
        ("/v1/models/echo:predict", b'{"input": "' + b"x" * 4096 + b'"}', 413, "exceeds the limit"),
    ],
)
async def test_bad_input_gets_clear_4xx(
    client: httpx.AsyncClient, path: str, body: bytes, status: int, needle: str
) -> None:
    r = await client.post(path, content=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert needle in err["message"]
    assert "Traceback" not in r.text


async def test_fastapi_fallback_route_answers_like_the_fast_path(gateway: GatewayService) -> None:
    transport = httpx.ASGITransport(app=gateway.api)  # the documented FastAPI route, without FastRoutes
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        r = await c.post("/v1/models/echo:predict", content=b"{}")
        assert r.status_code == 400 and r.json()["error"]["message"] == "input is required"
        r = await c.post("/v1/models/echo:predict", json={"input": 1})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"


async def test_unknown_route_is_json_404(client: httpx.AsyncClient) -> None:
    r = await client.get("/v9/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND"


async def test_no_nats_means_503_with_retry_after(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/models/echo:predict", json={"input": 1})
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "UNAVAILABLE"


async def test_metrics_count_requests_with_bounded_labels(client: httpx.AsyncClient) -> None:
    await client.post("/v1/models/echo:predict", json={"input": 1})
    await client.post("/v1/models/whatever-a-client-sends:predict", json={"input": 1})
    text = (await client.get("/metrics")).text
    assert 'unimodel_gateway_requests_total{api="http",code="UNAVAILABLE",model="echo"} 1.0' in text
    assert 'unimodel_gateway_requests_total{api="http",code="NOT_FOUND",model="_unknown"} 1.0' in text
    assert "whatever-a-client-sends" not in text
    assert "process_cpu_seconds_total" in text


async def test_readiness_names_failing_checks(client: httpx.AsyncClient) -> None:
    r = await client.get("/health/ready")
    assert r.status_code == 503
    checks = r.json()["checks"]
    assert checks["models"] is True and checks["nats"] is False and checks["router"] is False
    assert checks["accepting"] is True
    assert (await client.get("/health/live")).status_code == 200


async def test_readiness_fails_once_a_stop_begins(gateway: GatewayService, client: httpx.AsyncClient) -> None:
    gateway.request_stop()
    checks = (await client.get("/health/ready")).json()["checks"]
    assert checks["accepting"] is False
    assert (await client.get("/health/live")).status_code == 200  # still alive while it drains


async def test_streamed_body_over_the_limit_is_413_on_every_route(client: httpx.AsyncClient) -> None:
    async def chunks():  # no Content-Length: the limit applies while the body streams in
        for _ in range(4):
            yield b"x" * 1024

    r = await client.post("/v1/models/echo:predict", content=chunks())
    assert r.status_code == 413 and r.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    r = await client.post("/v1/models", content=b"x" * 4096)  # a FastAPI route (405) behind the same limit
    assert r.status_code == 413
