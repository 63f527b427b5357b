"""Issue 15, tenant isolation of shared capacity, on real components.

- The cache's eviction on its real stores (SQLite, Milvus Lite, all-MiniLM-L6-v2 on onnxruntime): a tenant
  filling its quota or the whole store never evicts another tenant's entries.
- One cluster (real nats-server, etcd, router, batcher, a gpu-worker with SmolLM2-135M on llama.cpp and the
  `delay` engine) behind a gateway whose keys come from UNIMODEL_API_KEYS / UNIMODEL_ADMIN_API_KEYS:
  per-key request and token limits (429, Retry-After, x-ratelimit-* through the openai SDK; gRPC
  RESOURCE_EXHAUSTED), the per-tenant share of a model's queue, and the KServe priority gate.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from helpers.minilm import Clock, Embedder
from helpers.support import Infra, Services
from unimodel.cache.entries import EntryStore
from unimodel.cache.querytext import Turn
from unimodel.cache.semantic import Limits, Scope, SemanticCache
from unimodel.cache.vectors import VectorIndex
from unimodel.core import modelconfig
from unimodel.core.membership import model_key
from unimodel.local.procs import free_port, http_ok, wait_until
from unimodel.v1 import generate_pb2, services_pb2_grpc

pytestmark = pytest.mark.timeout(300)

LLM = "smollm2-135m-instruct"
QUEUE_MODEL = "shared-queue"
KEYS = {
    "sk-a": {"tenant": "team-a", "requests_per_minute": 2},
    "sk-t": {"tenant": "team-t", "tokens_per_minute": 20},
    "sk-s": {"tenant": "team-s", "tokens_per_minute": 20},
    "sk-g": {"tenant": "team-g", "requests_per_minute": 1},
    "sk-u": {"tenant": "team-u", "tokens_per_minute": 20},
    "sk-p": {"tenant": "team-p", "priority": True},
    "sk-w": {"tenant": "team-w", "requests_per_minute": 2},
    "sk-q1": "team-q1",
    "sk-q2": "team-q2",
}
ADMIN = "sk-root"


# the cache: eviction stays within the inserting tenant ---------------------------------------------------------
@pytest.fixture
def cache(tmp_path: Path, model_repository: Path) -> Iterator[tuple[SemanticCache, Clock]]:
    clock = Clock()
    vectors = VectorIndex(str(tmp_path / "milvus.db"), "isolation", 384)
    made = SemanticCache(
        EntryStore(tmp_path / "cache.sqlite"), vectors, Embedder(model_repository / "all-minilm-l6-v2"),
        Limits(max_entries=4, max_entries_per_tenant=2), clock=clock,
    )
    try:
        yield made, clock
    finally:
        made.close()
        vectors.close()
        made.entries.close()


def q(text: str) -> list[Turn]:
    return [Turn("user", text)]


B_QUESTIONS = ["How do volcanoes form?", "Why is the sky blue?"]
A_QUESTIONS = [f"What is the boiling point of liquid number {i}?" for i in range(5)]


def test_finding_one_tenant_evicts_another_tenants_cache_entries(cache: tuple[SemanticCache, Clock]) -> None:
    """max_entries 4, max_entries_per_tenant 2: team-a inserting five entries in two of its scopes (models)
    keeps its own two most recent ones and never touches team-b's two (the old code evicted the least
    recently used entries of the whole store: team-b's)."""
    semantic, clock = cache
    b_scope = Scope("chat", "team-b")

    async def go() -> None:
        for i, text in enumerate(B_QUESTIONS):
            clock.now += 1
            await semantic.insert(b_scope, [(q(text), f"b{i}")])
        evicted = 0
        for i, text in enumerate(A_QUESTIONS):
            clock.now += 1
            evicted += (await semantic.insert(Scope("chat" if i % 2 else "other", "team-a"), [(q(text), f"a{i}")])).evicted
        assert evicted == 3
        assert await semantic.count(b_scope) == 2
        for i, text in enumerate(B_QUESTIONS):
            found = await semantic.query(b_scope, q(text))
            assert found.hit and found.entry is not None and found.entry.answer == f"b{i}"
        assert await semantic._sqlite(semantic.entries.count_tenant, "team-a") == 2
        assert (await semantic.query(Scope("other", "team-a"), q(A_QUESTIONS[4]), exact_only=True)).hit
        assert not (await semantic.query(Scope("other", "team-a"), q(A_QUESTIONS[0]), exact_only=True)).hit

    asyncio.run(go())


def test_a_full_store_makes_room_among_the_inserters_own_entries(cache: tuple[SemanticCache, Clock]) -> None:
    """The store (max_entries 4) is full of team-b's and team-c's entries: team-c's next insert evicts its
    own oldest entry, never team-b's, although team-b's are older."""
    semantic, clock = cache

    async def go() -> None:
        for i, text in enumerate(B_QUESTIONS):
            clock.now += 1
            await semantic.insert(Scope("chat", "team-b"), [(q(text), f"b{i}")])
        for i in range(3):
            clock.now += 1
            await semantic.insert(Scope("chat", "team-c"), [(q(A_QUESTIONS[i]), f"c{i}")])
        assert await semantic.count() == 4  # team-c: its quota of 2; team-b untouched
        assert await semantic.count(Scope("chat", "team-b")) == 2

    asyncio.run(go())


# the cluster ---------------------------------------------------------------------------------------------------
class Cluster:
    def __init__(self, url: str, grpc_target: str) -> None:
        self.url, self.grpc_target = url, grpc_target

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def infer(self, key: str, model: str = "delay", **parameters: object) -> httpx.Response:
        return httpx.post(f"{self.url}/v2/models/{model}/infer", json=_infer_body(**parameters), headers=_auth(key), timeout=30)


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _infer_body(**parameters: object) -> dict[str, object]:
    body: dict[str, object] = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 1], "data": [1.5]}]}
    if parameters:
        body["parameters"] = parameters
    return body


def _register(infra: Infra, config: dict[str, object]) -> None:
    parsed = modelconfig.parse(config)

    async def put() -> None:
        store = infra.store()  # as the services' etcd user
        try:
            await store.put(model_key("/unimodel/v1", parsed.name).encode(), parsed.SerializeToString())
        finally:
            await store.close()

    asyncio.run(put())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_repository: Path) -> Iterator[Cluster]:
    infra = Infra(tmp_path_factory.mktemp("isolation"))
    services = Services(infra)
    try:
        infra.start()
        services.start("router")
        services.start("batcher")  # max_queue_share: its default, 0.5
        services.start("gpu-worker", "--instance-id", "worker-0", name="worker-0")
        http_port, grpc_port = free_port(), free_port()
        # the keys as UNIMODEL_API_KEYS / UNIMODEL_ADMIN_API_KEYS would give them (JSON is YAML)
        config = tmp_path_factory.mktemp("keys") / "gateway.yaml"
        config.write_text(f"api_keys: {json.dumps(KEYS)}\nadmin_api_keys: {json.dumps({ADMIN: 'ops'})}\n")
        gw = services.start(
            "gateway", "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--config", str(config),
            "--model-repository", str(model_repository), "--load-models", f"{LLM},delay",
        )
        url = f"http://127.0.0.1:{http_port}"
        wait_until(lambda: http_ok(f"{url}/health/ready"), 60, "gateway ready", gw)
        _register(infra, {
            "name": QUEUE_MODEL, "engine": "delay", "max_batch_size": 8,
            "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
            "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}],
            "batching": {"max_queue_delay_ms": 2500, "max_queue_size": 4, "hold_when_idle": True}, "options": {"delay_ms": "10"},
        })

        def ready() -> bool:
            for name in (LLM, "delay", QUEUE_MODEL):
                r = httpx.get(f"{url}/v1/models/{name}/status", headers=_auth(ADMIN), timeout=5)
                if r.status_code != 200 or not any(i["state"] == "READY" for i in r.json()["instances"]):
                    return False
            return True

        wait_until(ready, 120, "models ready")
        yield Cluster(url, f"127.0.0.1:{grpc_port}")
    finally:
        services.stop()
        infra.stop()


CHAT = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


def _rpm_over_http(client: openai.OpenAI) -> None:
    for remaining in ("1", "0"):
        raw = client.models.with_raw_response.list()
        assert raw.http_response.status_code == 200
        assert raw.headers["x-ratelimit-limit-requests"] == "2"
        assert raw.headers["x-ratelimit-remaining-requests"] == remaining
        assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=LLM, messages=CHAT, max_tokens=4)  # type: ignore[arg-type]  # plain dicts: the SDK's TypedDicts at run time
    response = refused.value.response
    assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    error = response.json()["error"]  # OpenAI's shape
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert "requests per minute" in error["message"]


def test_finding_no_request_rate_limit_per_key_http(cluster: Cluster) -> None:
    with cluster.client("sk-a") as client:  # requests_per_minute 2
        _rpm_over_http(client)
    kserve = cluster.infer("sk-a")  # the KServe routes answer in their own shape
    assert kserve.status_code == 429 and "requests per minute" in kserve.json()["error"]
    # other keys are not affected; admins have no limits (and no headers)
    assert cluster.infer("sk-q1").status_code == 200
    admin = cluster.infer(ADMIN)
    assert admin.status_code == 200 and "x-ratelimit-limit-requests" not in admin.headers


def _tpm_over_http(client: openai.OpenAI, streamed: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model=LLM, messages=CHAT, max_tokens=8, temperature=0)  # type: ignore[arg-type]  # plain dicts: the SDK's TypedDicts at run time
    usage = raw.parse().usage
    assert usage is not None and usage.total_tokens > 20  # the system prompt alone is longer
    assert raw.headers["x-ratelimit-limit-tokens"] == "20"
    assert raw.headers["x-ratelimit-remaining-tokens"] == "0"  # debited before the answer was sent
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=LLM, messages=CHAT, max_tokens=8)  # type: ignore[arg-type]  # plain dicts: the SDK's TypedDicts at run time
    response = refused.value.response
    assert "tokens per minute" in response.json()["error"]["message"]
    assert int(response.headers["retry-after"]) >= 3  # the debt refills at 20 tokens / 60 s
    assert response.headers["x-ratelimit-remaining-tokens"] == "0"

    # the same, streamed: debited when the stream ends
    chunks = list(streamed.chat.completions.create(model=LLM, messages=CHAT, max_tokens=8, stream=True))  # type: ignore[arg-type]  # plain dicts: the SDK's TypedDicts at run time
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
    time.sleep(0.2)  # the debit runs as the stream closes
    with pytest.raises(openai.RateLimitError):
        streamed.chat.completions.create(model=LLM, messages=CHAT, max_tokens=8)  # type: ignore[arg-type]  # plain dicts: the SDK's TypedDicts at run time


def test_websocket_frames_take_from_the_keys_request_limit(cluster: Cluster) -> None:
    from websockets.sync.client import connect

    frame = {"type": "query", "scope": {"model": "ws-limit"}, "query": "Is this frame rate limited?"}
    url = cluster.url.replace("http", "ws") + "/modelcache"
    with connect(url, additional_headers=_auth("sk-w")) as ws:
        codes = []
        for i in range(3):
            ws.send(json.dumps({"requestId": i, "payload": frame}))
            reply = json.loads(ws.recv(timeout=30))
            assert reply["requestId"] == i, reply
            codes.append(reply["result"]["errorCode"])
        assert codes[:2] != [429, 429] and 429 not in codes[:2] and codes[2] == 429, codes
        assert "rate limit reached for requests per minute" in reply["result"]["errorDesc"], reply


def test_finding_no_token_rate_limit_per_key_after_a_real_generation(cluster: Cluster) -> None:
    with cluster.client("sk-t") as client, cluster.client("sk-s") as streamed:  # tokens_per_minute 20 each
        _tpm_over_http(client, streamed)
    with grpc.insecure_channel(cluster.grpc_target) as channel:  # gRPC Generate: the same bucket rules
        stub = services_pb2_grpc.InferenceServiceStub(channel)
        request = generate_pb2.GenerateRequest(model=LLM, messages=[generate_pb2.ChatMessage(**m) for m in CHAT])
        request.sampling.max_tokens = 8
        metadata = (("authorization", "Bearer sk-u"),)
        assert stub.GenerateUnary(request, metadata=metadata, timeout=60).usage.prompt_tokens > 20
        with pytest.raises(grpc.RpcError) as over:
            stub.GenerateUnary(request, metadata=metadata, timeout=60)
    assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "tokens per minute" in over.value.details()


def test_finding_no_request_rate_limit_per_key_grpc(cluster: Cluster) -> None:
    with grpc.insecure_channel(cluster.grpc_target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="delay")
        tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 1])
        tensor.contents.fp32_contents.append(1.5)
        metadata = (("authorization", "Bearer sk-g"),)  # requests_per_minute 1
        stub.ModelInfer(request, metadata=metadata, timeout=30)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request, metadata=metadata, timeout=30)
    err = refused.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "requests per minute" in err.details()
    trailers = dict(err.trailing_metadata())
    assert int(trailers["retry-after"]) >= 1 and "grpc-status-details-bin" in trailers


async def _flood(cluster: Cluster) -> tuple[list[httpx.Response], httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as client:
        url = f"{cluster.url}/v2/models/{QUEUE_MODEL}/infer"
        flood = [asyncio.create_task(client.post(url, json=_infer_body(), headers=_auth("sk-q1"))) for _ in range(4)]
        await asyncio.sleep(0.8)  # team-q1's requests wait in the 2.5 s batching window
        other = await client.post(url, json=_infer_body(), headers=_auth("sk-q2"))
        return list(await asyncio.gather(*flood)), other


def test_finding_one_tenant_fills_a_models_queue_for_everyone(cluster: Cluster) -> None:
    """max_queue_size 4, max_queue_share 0.5: team-q1 sending 4 at once gets 2 queued and 2 refused; team-q2
    still gets its answer (the old code queued all 4 of team-q1 and refused team-q2)."""
    flood, other = asyncio.run(_flood(cluster))
    assert other.status_code == 200, other.text
    statuses = sorted(r.status_code for r in flood)
    assert statuses == [200, 200, 429, 429], [r.text for r in flood]
    refused = next(r for r in flood if r.status_code == 429)
    assert "share" in refused.json()["error"] and int(refused.headers["retry-after"]) >= 1


def test_finding_any_key_may_jump_the_queue_with_kserve_priority(cluster: Cluster) -> None:
    refused = cluster.infer("sk-q1", priority=1)
    assert refused.status_code == 403 and "priority" in refused.json()["error"]
    assert cluster.infer("sk-q1").status_code == 200  # without the parameter
    assert cluster.infer("sk-p", priority=1).status_code == 200  # its policy allows priority
    assert cluster.infer(ADMIN, priority=1).status_code == 200
    with grpc.insecure_channel(cluster.grpc_target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="delay")
        tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 1])
        tensor.contents.fp32_contents.append(1.5)
        request.parameters["priority"].int64_param = 1
        with pytest.raises(grpc.RpcError) as denied:
            stub.ModelInfer(request, metadata=(("authorization", "Bearer sk-q2"),), timeout=30)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED and "priority" in denied.value.details()
        stub.ModelInfer(request, metadata=(("authorization", "Bearer sk-p"),), timeout=30)
