"""Issue 15, roles and open data: admin vs tenant keys on every HTTP route, the websocket and every gRPC
method; what a tenant sees of a model; the client's x-unimodel-tenant; the websocket's Origin; a gateway
without keys. In process (ASGI, a gRPC server on a Unix socket): no network. The same findings against a
running cluster: tests/integration/test_security_roles.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from google.protobuf import json_format
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from test_gateway_json_bodies import MemoryStore
from test_kserve_double import KServeDouble, serve_kserve_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from helpers.deploy_checks import REQUIRED_VARIABLE, compose
from unimodel.core.lifecycle import FatalError
from unimodel.gateway import auth
from unimodel.gateway.auth import ANONYMOUS, PRINCIPAL_KEY, ApiKeys, AuthMiddleware, GrpcAuthInterceptor
from unimodel.gateway.openai.errors import error_body
from unimodel.gateway.service import GatewayService
from unimodel.gateway.settings import GatewaySettings
from unimodel.v1 import model_pb2, registry_pb2, services_pb2

ROOT = Path(__file__).resolve().parents[2]
TENANT_KEYS = {"sk-a": "team-a", "sk-b": "team-b"}
ADMIN_KEYS = {"sk-root": "ops"}
A, B, ROOT_KEY = ({"authorization": f"Bearer {k}"} for k in ("sk-a", "sk-b", "sk-root"))
SECRETS = ("/srv/private/models", "model-secret.onnx", "/etc/passwd", "http://10.0.0.7:9000/v1", "PROD_OPENAI_KEY")
LEAKY = {
    "name": "leaky", "engine": "openai", "path": "/srv/private/models/leaky", "file": "model-secret.onnx",
    "max_batch_size": 0, "options": {"labels": "/etc/passwd"},
    "processing": {"kind": "tabular", "options": {"feature_names": "a,b", "labels": "/etc/passwd"}},
    "llm": {"context_length": 2048, "max_tokens": 512, "upstream_url": "http://10.0.0.7:9000/v1",
            "upstream_api_key_env": "PROD_OPENAI_KEY", "upstream_model": "gpt-internal"},
}


def leaky_config() -> model_pb2.ModelConfig:
    """A stored config with every kind of secret field (built directly: registration's checks are not
    the subject here)."""
    return json_format.ParseDict(LEAKY, model_pb2.ModelConfig())


def keyed_settings(**kw: Any) -> GatewaySettings:
    return GatewaySettings(api_keys=TENANT_KEYS, admin_api_keys=ADMIN_KEYS, **kw)


@pytest.fixture
async def gateway() -> AsyncIterator[GatewayService]:
    gw = GatewayService(keyed_settings(max_body_bytes=1 << 16), store=MemoryStore())
    gw.registered.apply("/unimodel/v1/models/leaky", leaky_config())
    failed = registry_pb2.ModelStatus(
        name="leaky", state=registry_pb2.ModelStatus.FAILED, error="cannot open /srv/private/models/leaky/model-secret.onnx",
    )
    gw.instances.apply(
        "/unimodel/v1/instances/gpu-worker/w1",
        registry_pb2.InstanceInfo(id="w1", kind="gpu-worker", models=["echo"], model_states=[failed]),
    )
    gw.instances.synced.set()
    gw.registered.synced.set()
    yield gw


@pytest.fixture
async def client(gateway: GatewayService) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app), base_url="http://gw") as c:
        yield c


# anyone can replace or unload any model ------------------------------------------------------------------
async def test_finding_anyone_can_replace_or_unload_a_model(gateway: GatewayService, client: httpx.AsyncClient) -> None:
    r = await client.delete("/v1/models/leaky")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    for method, path, body in (("DELETE", "/v1/models/leaky", None), ("POST", "/v1/models", {"name": "leaky"})):
        r = await client.request(method, path, json=body, headers=A)
        assert r.status_code == 403, (method, r.text)
        err = r.json()["error"]
        assert err["type"] == "permission_error" and err["code"] == "permission_denied"
        assert "admin API key" in err["message"] and "tenant" in err["message"]
    assert "leaky" in gateway.configs()  # nothing happened
    r = await client.delete("/v1/models/leaky", headers=ROOT_KEY)
    assert r.status_code == 200 and r.json()["state"] == "UNLOADING"
    assert "leaky" not in gateway.configs()


async def test_the_fast_path_and_every_route_need_a_key(client: httpx.AsyncClient) -> None:
    for method, path in (
        ("POST", "/v1/models/echo:predict"), ("POST", "/modelcache"), ("POST", "/v2/models/echo/infer"),
        ("GET", "/v1/models"), ("GET", "/v1/cache/log?model=m"), ("POST", "/v1/chat/completions"),
        ("POST", "/v1/audio/transcriptions"), ("POST", "/v1/audio/translations"),
    ):
        r = await client.request(method, path, content=b"{}")
        assert r.status_code == 401, (method, path, r.text)
        assert (await client.request(method, path, content=b"{}", headers=A)).status_code not in (401, 403)
    assert (await client.post("/v2/repository/index", headers=A)).status_code == 403
    assert (await client.get("/health/live")).status_code == 200


async def test_admin_routes_document_401_and_403(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json", headers=A)).json()
    for path, method in (("/v1/models", "post"), ("/v1/models/{name}", "delete")):
        responses = spec["paths"][path][method]["responses"]
        assert {"401", "403"} <= set(responses), (path, method)
        assert "admin" in responses["403"]["description"]


# status shows paths, URLs and key names to every caller ---------------------------------------------------
async def test_finding_status_shows_paths_urls_and_key_names(client: httpx.AsyncClient) -> None:
    tenant = await client.get("/v1/models/leaky/status", headers=A)
    assert tenant.status_code == 200
    for secret in SECRETS:
        assert secret not in tenant.text, secret
    doc = tenant.json()
    config = doc["config"]
    assert "path" not in config and "file" not in config and "options" not in config
    assert config["llm"] == {"context_length": 2048, "max_tokens": 512}  # limits stay visible
    assert config["processing"] == {"kind": "tabular"}
    assert doc["state"] == "FAILED" and doc["errors"] and doc["instances"][0]["error"]  # that it failed, not why
    admin = (await client.get("/v1/models/leaky/status", headers=ROOT_KEY)).json()
    assert admin["config"]["path"] == "/srv/private/models/leaky"
    assert admin["config"]["llm"]["upstream_api_key_env"] == "PROD_OPENAI_KEY"
    assert "model-secret.onnx" in admin["instances"][0]["error"]
    # KServe's model configuration, HTTP: no file name, no options for a tenant
    triton = await client.get("/v2/models/leaky/config", headers=A)
    assert triton.status_code == 200 and triton.json()["default_model_filename"] == ""
    for secret in SECRETS:
        assert secret not in triton.text, secret
    assert (await client.get("/v2/models/leaky/config", headers=ROOT_KEY)).json()["default_model_filename"] == "model-secret.onnx"


# a client-sent x-unimodel-tenant picks any tenant ---------------------------------------------------------
async def _seen_by_app(keys: ApiKeys, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """What the app behind AuthMiddleware receives for a request with these headers."""
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["principal"] = scope[PRINCIPAL_KEY]
        seen["tenant"] = [v for k, v in scope["headers"] if k == b"x-unimodel-tenant"]
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers}
    await AuthMiddleware(app, keys, error_body)(scope, receive, send)
    seen["status"] = sent[0]["status"]
    return seen


async def test_finding_client_tenant_header_picks_any_tenant() -> None:
    # no keys: one anonymous user in the shared scope, whatever the header says (HTTP and gRPC)
    open_mode = await _seen_by_app(ApiKeys({}), [(b"x-unimodel-tenant", b"team-b")])
    assert open_mode["principal"] == ANONYMOUS and open_mode["tenant"] == []
    assert ApiKeys({}).tenant_from_metadata([("x-unimodel-tenant", "team-b")]) == ""
    # a tenant key: the key's tenant, never the header's
    keys = ApiKeys(TENANT_KEYS, ADMIN_KEYS)
    tenant = await _seen_by_app(keys, [(b"authorization", b"Bearer sk-a"), (b"x-unimodel-tenant", b"team-b")])
    assert tenant["tenant"] == [b"team-a"] and not tenant["principal"].admin
    assert keys.tenant_from_metadata([("authorization", "Bearer sk-a"), ("x-unimodel-tenant", "team-b")]) == "team-a"
    # an admin key: the shared scope, or any tenant's scope it names
    admin = await _seen_by_app(keys, [(b"x-api-key", b"sk-root"), (b"x-unimodel-tenant", b"team-b")])
    assert admin["tenant"] == [b"team-b"] and admin["principal"].admin and admin["principal"].name == "ops"
    assert (await _seen_by_app(keys, [(b"x-api-key", b"sk-root")]))["tenant"] == []
    # key ids are stable and say nothing of the key
    assert tenant["principal"].key_id == auth.key_id("sk-a") and "sk-a" not in tenant["principal"].key_id
    assert (await _seen_by_app(keys, [(b"authorization", b"Bearer sk-nope")]))["status"] == 401


def test_a_key_table_that_would_blur_roles_is_refused() -> None:
    with pytest.raises(ValueError, match="names no tenant"):
        ApiKeys({"sk-a": ""})
    with pytest.raises(ValueError, match="also a tenant key"):
        ApiKeys({"sk-a": "team-a"}, {"sk-a": "ops"})


# the websocket has no Origin check ----------------------------------------------------------------------
def test_finding_websocket_has_no_origin_check(gateway: GatewayService) -> None:
    with TestClient(gateway.app) as tc:  # Host: testserver
        with pytest.raises(WebSocketDisconnect) as refused:
            with tc.websocket_connect("/modelcache", headers={**ROOT_KEY, "origin": "https://evil.example"}):
                pass
        assert refused.value.code == 1008
        with pytest.raises(WebSocketDisconnect) as refused:
            with tc.websocket_connect("/modelcache", headers={"origin": "http://testserver"}):  # no key
                pass
        assert refused.value.code == 1008
        with pytest.raises(WebSocketDisconnect):  # a tenant key, a bad origin
            with tc.websocket_connect("/modelcache", headers={**A, "origin": "null"}):
                pass
        for headers in ({**A, "origin": "http://testserver"}, A):  # its own origin; no Origin: not a browser
            with tc.websocket_connect("/modelcache", headers=headers) as ws:
                ws.send_json({"requestId": 1, "payload": "not a request"})
                assert ws.receive_json()["requestId"] == 1


async def test_without_keys_a_page_elsewhere_cannot_administer_a_loopback_gateway() -> None:
    cross_site = [(b"origin", b"https://evil.example"), (b"host", b"127.0.0.1:8000")]
    assert (await _seen_by_app(ApiKeys({}), cross_site))["status"] == 403
    assert (await _seen_by_app(ApiKeys({}), [(b"origin", b"http://127.0.0.1:8000"), (b"host", b"127.0.0.1:8000")]))["status"] == 204
    assert (await _seen_by_app(ApiKeys({}), [(b"host", b"127.0.0.1:8000")]))["status"] == 204  # curl, SDKs
    # with keys a cross-site page has no key to send (keys are headers, not cookies)
    assert (await _seen_by_app(ApiKeys(TENANT_KEYS), [*cross_site, (b"authorization", b"Bearer sk-a")]))["status"] == 204


def test_origin_rule() -> None:
    allowed = ["https://app.example.com"]
    assert auth.origin_allowed("", "gw:8000", allowed)
    assert auth.origin_allowed("http://gw:8000", "gw:8000", allowed)
    assert auth.origin_allowed("https://gw.example.com", "gw.example.com:443", allowed)
    assert auth.origin_allowed("https://APP.example.com/", "gw:8000", allowed)
    assert not auth.origin_allowed("http://gw:8001", "gw:8000", allowed)
    assert not auth.origin_allowed("null", "gw:8000", allowed)
    assert not auth.origin_allowed("http://evil.example", "gw:8000", allowed)


# with no keys configured nothing warns ---------------------------------------------------------------------
def test_finding_no_keys_serves_any_address_silently() -> None:
    for host in ("0.0.0.0", "::", "10.1.2.3", "gw.example.com"):
        with pytest.raises(FatalError, match=r"no API keys configured and host .* is not loopback"):
            GatewayService(GatewaySettings(host=host))
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert auth.check_exposure(GatewaySettings(host=host), ApiKeys({})).startswith("WARNING: no API keys configured")
    opened = auth.check_exposure(GatewaySettings(host="0.0.0.0", insecure_open=True), ApiKeys({}))
    assert opened.startswith("WARNING: no API keys configured and insecure_open is set")
    assert auth.check_exposure(keyed_settings(host="0.0.0.0"), ApiKeys(TENANT_KEYS, ADMIN_KEYS)) == ""
    assert auth.check_exposure(GatewaySettings(host="0.0.0.0", admin_api_keys=ADMIN_KEYS), ApiKeys({}, ADMIN_KEYS)) == ""


# gRPC: admin methods for any key ---------------------------------------------------------------------------
@pytest.fixture
async def grpc_channel() -> AsyncIterator[grpc.aio.Channel]:
    gw = KServeDouble()
    gw.auth = ApiKeys(TENANT_KEYS, ADMIN_KEYS)
    gw.configs_by_name["leaky"] = leaky_config()
    async with serve_kserve_grpc(gw, [GrpcAuthInterceptor(gw.auth)]) as target, grpc.aio.insecure_channel(target) as channel:
        yield channel


def _md(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),) if key else ()


async def test_finding_grpc_admin_method_for_any_key(grpc_channel: grpc.aio.Channel) -> None:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc_channel)
    load = service_pb2.RepositoryModelLoadRequest(model_name="leaky")
    for key, code in (("", grpc.StatusCode.UNAUTHENTICATED), ("sk-a", grpc.StatusCode.PERMISSION_DENIED),
                      ("sk-root", grpc.StatusCode.UNIMPLEMENTED)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.RepositoryModelLoad(load, metadata=_md(key))
        assert err.value.code() == code, key
        if code == grpc.StatusCode.PERMISSION_DENIED:
            assert "admin API key" in (err.value.details() or "")
            assert any(k == "grpc-status-details-bin" for k, _ in err.value.trailing_metadata() or ())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.RepositoryModelUnload(service_pb2.RepositoryModelUnloadRequest(model_name="leaky"), metadata=_md("sk-b"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # a tenant may read the model's config, without its file name and options
    tenant = await stub.ModelConfig(service_pb2.ModelConfigRequest(name="leaky"), metadata=_md("sk-a"))
    assert tenant.config.default_model_filename == "" and "labels" not in tenant.config.parameters
    admin = await stub.ModelConfig(service_pb2.ModelConfigRequest(name="leaky"), metadata=_md("sk-root"))
    assert admin.config.default_model_filename == "model-secret.onnx" and "labels" in admin.config.parameters
    assert (await stub.ServerLive(service_pb2.ServerLiveRequest(), metadata=_md("sk-b"))).live


def test_every_grpc_method_has_a_role() -> None:
    """The role table names every method a tenant may call; the rest are admin-only by default."""
    methods = {
        f"/{svc.full_name}/{m.name}"
        for svc in (services_pb2.DESCRIPTOR.services_by_name["InferenceService"],
                    service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"])
        for m in svc.methods
    }
    assert auth.GRPC_TENANT_METHODS <= methods
    admin = {m for m in methods if auth.grpc_needs_admin(m)}
    assert {m.rsplit("/", 1)[1] for m in admin} == {
        "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload", "SystemSharedMemoryStatus",
        "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus",
        "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister", "TraceSetting", "LogSettings",
    }
    assert auth.grpc_needs_admin("/some.Unknown/Method")


# the Kubernetes Secret for keys is optional ---------------------------------------------------------------
def test_finding_deployments_run_without_keys() -> None:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "base" / "gateway.yaml").read_text()))
    (deployment,) = [d for d in docs if d and d.get("kind") == "Deployment"]
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    for var in ("UNIMODEL_API_KEYS", "UNIMODEL_ADMIN_API_KEYS"):
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "unimodel-api-keys" and not ref.get("optional"), var
    gateway_env = compose()["services"]["gateway"]["environment"]
    for var in ("UNIMODEL_API_KEYS", "UNIMODEL_ADMIN_API_KEYS"):
        required = REQUIRED_VARIABLE.match(str(gateway_env[var]))
        assert required and required.group(1) == var, gateway_env.get(var)

