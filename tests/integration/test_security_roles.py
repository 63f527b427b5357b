"""Issue 15, roles and open data, against a running cluster: real nats-server, etcd, router, batcher, cache
(Milvus Lite), embedding-worker (all-MiniLM-L6-v2) and gpu-worker, with two gateways: one without keys on
loopback (as `unimodel up` runs it) and one with tenant and admin keys (api_keys / admin_api_keys in its
--config file).

One test per finding: anyone can replace or unload a model; tenant A reads tenant B's cache log and
entries; status shows paths to tenants; a client-sent x-unimodel-tenant picks the scope; the websocket has
no Origin check; with no keys the gateway serves any address silently; gRPC admin methods for any key.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from helpers.support import Infra, Services
from unimodel.local.procs import ManagedProcess, free_port, http_ok, wait_until

EMBEDDER = "all-minilm-l6-v2"
KEYS = "api_keys:\n  sk-a: team-a\n  sk-b: team-b\nadmin_api_keys:\n  sk-root: ops\n"  # the gateway's --config
A, B, ROOT = ({"authorization": f"Bearer {k}"} for k in ("sk-a", "sk-b", "sk-root"))
pytestmark = pytest.mark.timeout(300)


class Cluster:
    def __init__(self, infra: Infra, services: Services, repository: Path) -> None:
        self.infra, self.services, self.repository = infra, services, repository
        self.open_url = ""
        self.url = ""  # the gateway with keys
        self.grpc_target = ""
        self.gateway: ManagedProcess | None = None

    def mc(self, data: object, headers: dict[str, str], url: str = "") -> dict:
        r = httpx.post(f"{url or self.url}/modelcache", json=data, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def log(self, model: str, headers: dict[str, str]) -> str:
        """The queries of the scope's hit log, one text."""
        r = httpx.get(f"{self.url}/v1/cache/log", params={"model": model}, headers=headers, timeout=10)
        assert r.status_code == 200, r.text
        return "\n".join(rec["query"] for rec in r.json()["records"])


def query(model: str, text: str) -> dict:
    return {"type": "query", "scope": {"model": model}, "query": text}


def insert(model: str, question: str, answer: str) -> dict:
    return {"type": "insert", "scope": {"model": model},
            "chat_info": [{"query": [{"role": "user", "content": question}], "answer": answer}]}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_repository: Path) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("roles")
    infra = Infra(tmp)
    services = Services(infra)
    c = Cluster(infra, services, model_repository)
    try:
        infra.start()
        services.start_cluster(workers=1, all_six=True, repository=model_repository, models=EMBEDDER)
        c.open_url = services.url
        port, grpc_port = free_port(), free_port()
        config = tmp / "gateway-keys.yaml"
        config.write_text(KEYS)
        c.gateway = services.start(
            "gateway", "--http-port", str(port), "--grpc-port", str(grpc_port), "--config", str(config),
            "--model-repository", str(model_repository), name="gateway-keys",
        )
        c.url, c.grpc_target = f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"
        wait_until(lambda: http_ok(f"{c.url}/health/ready"), 60, "the gateway with keys ready", c.gateway)
        yield c
    finally:
        services.stop()
        infra.stop()


def test_finding_anyone_can_replace_or_unload_a_model(cluster: Cluster) -> None:
    url = cluster.url
    assert httpx.delete(f"{url}/v1/models/{EMBEDDER}", timeout=10).status_code == 401
    for method, path, body in (("DELETE", f"/v1/models/{EMBEDDER}", None), ("POST", "/v1/models", {"name": EMBEDDER})):
        r = httpx.request(method, url + path, json=body, headers=A, timeout=10)
        assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied", r.text
        assert "admin API key" in r.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/models/{EMBEDDER}/status", headers=A, timeout=10).json()["state"] == "READY"
    # an admin registers and unregisters
    r = httpx.post(f"{url}/v1/models", json={"name": "identity"}, headers=ROOT, timeout=10)
    assert r.status_code == 202, r.text
    r = httpx.delete(f"{url}/v1/models/identity", headers=ROOT, timeout=10)
    assert r.status_code == 200 and r.json()["state"] == "UNLOADING", r.text


def test_finding_grpc_admin_methods_for_any_key(cluster: Cluster) -> None:
    with grpc.insecure_channel(cluster.grpc_target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.RepositoryModelUnloadRequest(model_name=EMBEDDER)
        for headers, code in (({}, grpc.StatusCode.UNAUTHENTICATED), (A, grpc.StatusCode.PERMISSION_DENIED),
                              (ROOT, grpc.StatusCode.UNIMPLEMENTED)):
            with pytest.raises(grpc.RpcError) as err:
                stub.RepositoryModelUnload(request, metadata=tuple(headers.items()), timeout=10)
            assert err.value.code() == code, headers  # type: ignore[attr-defined]  # a grpc.Call as well
        live = stub.ServerLive(service_pb2.ServerLiveRequest(), metadata=tuple(B.items()), timeout=10)
        assert live.live


def test_finding_status_shows_paths_to_every_caller(cluster: Cluster) -> None:
    tenant = httpx.get(f"{cluster.url}/v1/models/{EMBEDDER}/status", headers=A, timeout=10)
    assert tenant.status_code == 200 and tenant.json()["state"] == "READY"
    assert str(cluster.repository) not in tenant.text and "path" not in tenant.json()["config"]
    assert "options" not in tenant.json()["config"].get("processing", {})
    assert tenant.json()["config"]["inputs"]  # the io specs stay
    admin = httpx.get(f"{cluster.url}/v1/models/{EMBEDDER}/status", headers=ROOT, timeout=10).json()
    assert admin["config"]["path"].startswith(str(cluster.repository))


def test_finding_cache_log_shows_other_tenants_conversations(cluster: Cluster) -> None:
    model, question = "roles-log", "What is the capital of Freedonia?"
    assert cluster.mc(insert(model, question, "Fredville"), A)["errorCode"] == 0
    assert cluster.mc(query(model, question), A)["cacheHit"] is True
    wait_until(lambda: question in cluster.log(model, A), 20, "team a's lookup in its hit log")
    # team b: neither team a's hit log nor its entries, also when it names team a (logs first: b's own
    # lookups below land in b's log)
    assert question not in cluster.log(model, B)
    assert question not in cluster.log(model, {**B, "x-unimodel-tenant": "team-a"})
    assert cluster.mc(query(model, question), B)["cacheHit"] is False
    assert cluster.mc(query(model, question), {**B, "x-unimodel-tenant": "team-a"})["cacheHit"] is False
    # an admin reads (and queries) any tenant's scope by naming it; its own is the shared one
    assert question not in cluster.log(model, ROOT)
    assert question in cluster.log(model, {**ROOT, "x-unimodel-tenant": "team-a"})
    assert cluster.mc(query(model, question), {**ROOT, "x-unimodel-tenant": "team-a"})["cacheHit"] is True


def test_finding_client_tenant_header_picks_the_scope_in_open_mode(cluster: Cluster) -> None:
    model, question = "roles-open", "How many moons does Mars have?"
    url = cluster.open_url
    assert cluster.mc(insert(model, question, "Two"), {"x-unimodel-tenant": "team-x"}, url=url)["errorCode"] == 0
    # the header was ignored: the entry is in the one shared scope of an open gateway
    assert cluster.mc(query(model, question), {}, url=url)["cacheHit"] is True
    assert cluster.mc(query(model, question), {"x-unimodel-tenant": "team-y"}, url=url)["cacheHit"] is True


def test_finding_websocket_has_no_origin_check(cluster: Cluster) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    ws_url = cluster.url.replace("http", "ws") + "/modelcache"
    for origin in ("http://evil.example", "null", cluster.url.replace("127.0.0.1", "localhost")):
        with pytest.raises(InvalidStatus) as refused:
            connect(ws_url, origin=origin, additional_headers=A, open_timeout=10)  # type: ignore[arg-type]  # websockets types Origin as a NewType of str
        assert refused.value.response.status_code == 403, origin
    with pytest.raises(InvalidStatus) as refused:  # the right origin, no key
        connect(ws_url, origin=cluster.url, open_timeout=10)  # type: ignore[arg-type]  # as above
    assert refused.value.response.status_code == 403
    for origin in (cluster.url, None):  # the gateway's own page; a client that is not a browser
        with connect(ws_url, origin=origin, additional_headers=A, open_timeout=10) as ws:  # type: ignore[arg-type]  # as above
            ws.send(json.dumps({"requestId": 1, "payload": query("roles-ws", "anything cached?")}))
            assert json.loads(ws.recv(timeout=30))["result"]["cacheHit"] is False


def test_finding_no_keys_serves_any_address_silently(cluster: Cluster) -> None:
    refused = cluster.services.start(
        "gateway", "--host", "0.0.0.0", "--http-port", str(free_port()), "--grpc-port", str(free_port()),
        name="gateway-exposed",
    )
    assert refused.wait(60) == 1
    assert any("no API keys configured and host '0.0.0.0' is not loopback" in line for line in refused.lines), refused.lines
    assert not any("Traceback" in line for line in refused.lines)
    log = cluster.infra.sink.getvalue().splitlines()

    def warnings(name: str) -> list[str]:
        return [line for line in log if line.lstrip().startswith(f"{name} |") and "WARNING: no API keys configured" in line]

    assert len(warnings("gateway")) == 1  # the open gateway, on loopback: one loud line
    assert warnings("gateway-keys") == []
