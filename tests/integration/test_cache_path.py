"""The semantic cache and the embedding path end to end: real nats-server, etcd, Milvus Lite (its server
binary, as `unimodel up` runs it), the six services, all-MiniLM-L6-v2 on an embedding-worker and
SmolLM2 on a gpu-worker.

Covers: OpenAI /v1/embeddings with the openai SDK; ModelCache's REST API (JSON and JSON-string bodies)
and its websocket; exact and semantic hits; remove; bad input leaving nothing written; scopes (model
and tenant) as hard partitions; the automatic cache in front of /v1/chat/completions (miss, write-back,
hit, streamed hit, per-request off); fail-open when Milvus and then the cache service are down.
One cluster per module; the fail-open tests run last.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from helpers.support import Infra, Services
from unimodel.local.procs import ManagedProcess, MilvusLiteServer, free_port, http_ok, wait_until

EMBEDDER = "all-minilm-l6-v2"
LLM = "smollm2-135m-instruct"
pytestmark = pytest.mark.timeout(300)


class Cluster:
    def __init__(self, infra: Infra, services: Services) -> None:
        self.infra, self.services = infra, services
        self.url = services.url
        self.auth_url = ""
        self.milvus: MilvusLiteServer | None = None
        self.cache: ManagedProcess | None = None
        self.cache_metrics = 0

    def mc(self, data: object, *, url: str = "", as_string: bool = True, key: str = "") -> httpx.Response:
        """A ModelCache request as its clients send it: json=json.dumps(data)."""
        headers = {"authorization": f"Bearer {key}"} if key else {}
        body = json.dumps(data) if as_string else data
        return httpx.post(f"{url or self.url}/modelcache", json=body, headers=headers, timeout=30)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def start_cache(self) -> ManagedProcess:
        assert self.milvus is not None
        self.cache_metrics = free_port()
        self.cache = self.services.start(
            "cache", "--data-dir", str(self.infra.tmp / "cache"), "--milvus-uri", self.milvus.uri,
            "--metrics-port", str(self.cache_metrics),
        )
        return self.cache


def query(model: str, text: str) -> dict:
    return {"type": "query", "scope": {"model": model}, "query": [{"role": "user", "content": text}]}


def insert(model: str, *pairs: tuple[str, str]) -> dict:
    return {
        "type": "insert", "scope": {"model": model},
        "chat_info": [{"query": [{"role": "user", "content": q}], "answer": a} for q, a in pairs],
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_repository: Path) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cache")
    infra = Infra(tmp)
    services = Services(infra)
    c = Cluster(infra, services)
    try:
        infra.start()
        c.milvus = MilvusLiteServer(free_port(), tmp / "milvus", sink=infra.sink)
        c.milvus.start_and_wait()
        c.start_cache()
        services.start_cluster(workers=1, all_six=False, repository=model_repository, models=f"{EMBEDDER},{LLM}")
        services.start("embedding-worker", "--instance-id", "embedder-0", name="embedder-0")
        services.wait_models([EMBEDDER, LLM])
        c.url = services.url
        port = free_port()
        config = tmp / "gateway.yaml"
        config.write_text("api_keys:\n  sk-team-a: team-a\n  sk-team-b: team-b\n")
        gw = services.start(
            "gateway", "--http-port", str(port), "--grpc-port", str(free_port()), "--config", str(config),
            name="gateway-auth",
        )
        c.auth_url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(f"{c.auth_url}/health/ready"), 60, "auth gateway ready", gw)
        # the embedding model moved to the embedding-worker once it joined
        wait_until(
            lambda: [i["id"] for i in httpx.get(f"{c.url}/v1/models/{EMBEDDER}/status").json()["instances"]
                     if i["state"] == "READY"] == ["embedder-0"],
            60, "all-minilm-l6-v2 on the embedding-worker only",
        )
        yield c
    finally:
        services.stop()
        if c.milvus is not None:
            c.milvus.stop()
        infra.stop()


# embeddings ------------------------------------------------------------------------------------------
def test_embeddings_with_the_openai_sdk(cluster: Cluster) -> None:
    client = cluster.client()
    one = client.embeddings.create(model=EMBEDDER, input="How do I reset my password?")  # SDK asks for base64
    assert len(one.data) == 1 and len(one.data[0].embedding) == 384
    assert one.usage.prompt_tokens > 3 and one.usage.total_tokens == one.usage.prompt_tokens
    texts = ["How do I reset my password?", "How can I change my password?", "The cat sat on the mat."]
    many = client.embeddings.create(model=EMBEDDER, input=texts, encoding_format="float")
    vectors = np.array([d.embedding for d in many.data])
    assert [d.index for d in many.data] == [0, 1, 2]
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert np.allclose(vectors[0], one.data[0].embedding, atol=1e-5)  # base64 and float agree
    sims = vectors @ vectors.T
    assert sims[0, 1] > 0.7 > 0.2 > sims[0, 2]
    # a long list is split into requests of the model's max batch size and comes back in order
    long = client.embeddings.create(model=EMBEDDER, input=[f"sentence number {i}" for i in range(150)])
    assert [d.index for d in long.data] == list(range(150))


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"model": EMBEDDER, "input": []}, 400, "empty"),
        ({"model": EMBEDDER, "input": [""]}, 400, "empty string"),
        ({"model": EMBEDDER, "input": [[1, 2, 3]]}, 400, "token arrays"),
        ({"model": EMBEDDER, "input": "x", "dimensions": 128}, 400, "384"),
        ({"model": EMBEDDER, "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"model": LLM, "input": "x"}, 400, "not a text-embedding model"),
        ({"model": "no-such-model", "input": "x"}, 404, "not found"),
        ({"input": "x"}, 400, "model"),
    ],
)
def test_embeddings_bad_input(cluster: Cluster, body: dict, status: int, fragment: str) -> None:
    r = httpx.post(f"{cluster.url}/v1/embeddings", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]


# ModelCache API ---------------------------------------------------------------------------------------
def test_modelcache_insert_query_remove(cluster: Cluster) -> None:
    model = "mc-basic"
    r = cluster.mc(insert(model, ("What is the capital of France?", "Paris."), ("How do I boil an egg?", "Ten minutes.")))
    assert r.status_code == 200 and r.json()["errorCode"] == 0 and r.json()["writeStatus"] == "success", r.text
    ids = r.json()["ids"]
    assert len(ids) == 2
    exact = cluster.mc(query(model, "what is the capital of France")).json()  # case and punctuation
    assert exact["cacheHit"] is True and exact["exact"] is True and exact["answer"] == "Paris."
    assert exact["hit_query"] == "user###What is the capital of France?"
    assert exact["delta_time"].endswith("s")
    semantic = cluster.mc(query(model, "What is the capital city of France?"), as_string=False).json()
    assert semantic["cacheHit"] is True and semantic["exact"] is False and semantic["answer"] == "Paris."
    assert 0.8 < semantic["similarity"] < 1.0
    assert semantic["verification"]["verdict"] == "accepted" and 0 < semantic["verification"]["score"] <= 1
    assert "verification" not in exact  # the exact path needs no verification
    miss = cluster.mc(query(model, "What is the tallest mountain on Earth?")).json()
    assert miss == {**miss, "errorCode": 0, "cacheHit": False, "answer": "", "hit_query": ""}
    # the guard: same words, other number
    assert cluster.mc(query(model, "How do I boil 12 eggs?")).json()["cacheHit"] is False
    removed = cluster.mc({"type": "remove", "scope": {"model": model}, "remove_type": "delete_by_id", "id_list": [ids[0]]})
    assert removed.json()["errorCode"] == 0 and removed.json()["response"]["removed"] == 1
    assert cluster.mc(query(model, "What is the capital of France?")).json()["cacheHit"] is False
    assert cluster.mc(query(model, "How do I boil an egg?")).json()["cacheHit"] is True
    truncated = cluster.mc({"type": "remove", "scope": {"model": model}, "remove_type": "truncate_by_model"})
    assert truncated.json()["response"]["removed"] == 1
    assert cluster.mc(query(model, "How do I boil an egg?")).json()["cacheHit"] is False
    assert cluster.mc({"type": "register", "scope": {"model": model}}).json()["errorCode"] == 0
    # the hit log saw every lookup, newest first
    log = httpx.get(f"{cluster.url}/v1/cache/log", params={"model": model, "limit": 3}, timeout=10).json()["records"]
    assert len(log) == 3 and log[0]["hit"] is False and log[0]["latency_ms"] > 0
    assert all(r["verdict"] in ("", "accepted", "rejected") and 0 <= r["verify_score"] <= 1 for r in log)


def test_multi_turn_and_system_prompt_are_part_of_the_key(cluster: Cluster) -> None:
    model = "mc-turns"
    conversation = [
        {"role": "system", "content": "You are a helpful travel assistant."},
        {"role": "user", "content": "Suggest a weekend trip from Berlin."},
    ]
    r = cluster.mc({"type": "insert", "scope": {"model": model}, "chat_info": [{"query": conversation, "answer": "Dresden."}]})
    assert r.json()["errorCode"] == 0
    hit = cluster.mc({"type": "query", "scope": {"model": model}, "query": conversation}).json()
    assert hit["cacheHit"] and hit["exact"] and hit["hit_query"].startswith("system###You are a helpful travel assistant.|||user###")
    alone = cluster.mc(query(model, "Suggest a weekend trip from Berlin.")).json()
    assert not alone.get("exact")


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"type": "upsert", "scope": {"model": "m"}}, "type exception"),
        ({"type": "query", "query": [{"role": "user", "content": "hi"}]}, "scope"),
        ({"type": "query", "scope": {"model": "m"}, "query": []}, "non-empty"),
        ({"type": "query", "scope": {"model": "m"}, "query": [{"role": "user", "content": "  "}]}, "empty"),
        ({"type": "query", "scope": {"model": "m"}, "query": [{"role": "wizard", "content": "hi"}]}, "role"),
        ({"type": "insert", "scope": {"model": "m"}, "chat_info": []}, "chat_info"),
        ({"type": "remove", "scope": {"model": "m"}, "remove_type": "everything"}, "remove_type"),
        ({"type": "remove", "scope": {"model": "m"}, "remove_type": "delete_by_id", "id_list": ["x"]}, "id_list"),
        ("not json at all", "JSON"),
    ],
)
def test_modelcache_bad_input(cluster: Cluster, data: object, fragment: str) -> None:
    if isinstance(data, str):
        r = httpx.post(f"{cluster.url}/modelcache", content=data, timeout=10)
    else:
        r = cluster.mc(data)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["errorCode"] == 103 and fragment in body["errorDesc"]


def test_insert_is_all_or_nothing(cluster: Cluster) -> None:
    model = "mc-atomic"
    big = "x" * (300 * 1024)  # over max_answer_bytes
    r = cluster.mc(insert(model, ("A fine question about rivers?", "A fine answer."), ("Another question?", big)))
    assert r.status_code == 400 and r.json()["errorCode"] == 103 and "bytes" in r.json()["errorDesc"]
    assert r.json()["writeStatus"] == "exception"
    assert cluster.mc(query(model, "A fine question about rivers?")).json()["cacheHit"] is False


def test_websocket_api(cluster: Cluster) -> None:
    from websockets.sync.client import connect

    with connect(cluster.url.replace("http", "ws") + "/modelcache") as ws:
        ws.send(json.dumps({"requestId": "r1", "payload": insert("mc-ws", ("Is the websocket API supported?", "Yes."))}))
        first = json.loads(ws.recv(timeout=30))
        assert first["requestId"] == "r1" and first["result"]["errorCode"] == 0 and first["result"]["writeStatus"] == "success"
        ws.send(json.dumps({"requestId": "r2", "payload": json.dumps(query("mc-ws", "Is the websocket API supported?"))}))
        reply = json.loads(ws.recv(timeout=30))
        assert reply["requestId"] == "r2" and reply["result"]["cacheHit"] is True and reply["result"]["answer"] == "Yes."
        ws.send("this is not json")
        bad = json.loads(ws.recv(timeout=10))
        assert bad["requestId"] is None and bad["result"]["errorCode"] == 400
        ws.send(json.dumps({"payload": query("mc-ws", "x")}))
        assert json.loads(ws.recv(timeout=10))["result"]["errorCode"] == 400
        ws.send(json.dumps({"requestId": 7, "payload": {"type": "nope", "scope": {"model": "mc-ws"}}}))
        reply = json.loads(ws.recv(timeout=10))
        assert reply["requestId"] == 7 and reply["result"]["errorCode"] == 103
        # still open after the bad frames
        ws.send(json.dumps({"requestId": "r3", "payload": query("mc-ws", "Is the websocket API supported?")}))
        assert json.loads(ws.recv(timeout=30))["result"]["cacheHit"] is True


def test_scopes_are_hard_partitions(cluster: Cluster) -> None:
    question = "What is the boiling point of water at sea level?"
    assert cluster.mc(insert("scope-a", (question, "100 C"))).json()["errorCode"] == 0
    # identical text, other model scope: a miss whatever the similarity
    assert cluster.mc(query("scope-b", question)).json()["cacheHit"] is False
    # tenants: the key decides the scope; another tenant never sees the entry
    assert cluster.mc(insert("shared-model", (question, "team a's answer")), url=cluster.auth_url, key="sk-team-a").json()["errorCode"] == 0
    a = cluster.mc(query("shared-model", question), url=cluster.auth_url, key="sk-team-a").json()
    b = cluster.mc(query("shared-model", question), url=cluster.auth_url, key="sk-team-b").json()
    plain = cluster.mc(query("shared-model", question)).json()
    assert a["cacheHit"] is True and a["answer"] == "team a's answer"
    assert b["cacheHit"] is False and plain["cacheHit"] is False
    assert httpx.post(f"{cluster.auth_url}/modelcache", json=query("shared-model", question), timeout=10).status_code == 401


# the chat path --------------------------------------------------------------------------------------
def _chat(cluster: Cluster, text: str, **extra: object) -> httpx.Response:
    body = {"model": LLM, "messages": [{"role": "user", "content": text}], "max_tokens": 12, "temperature": 0, **extra}
    return httpx.post(f"{cluster.url}/v1/chat/completions", json=body, timeout=120)


def test_chat_miss_write_back_then_hit(cluster: Cluster) -> None:
    question = "Name one primary colour, please."
    first = _chat(cluster, question, max_tokens=64)
    assert first.status_code == 200 and first.headers["x-unimodel-cache"] == "miss"
    answer = first.json()["choices"][0]["message"]["content"]
    finish = first.json()["choices"][0]["finish_reason"]
    if finish != "stop":
        pytest.skip(f"the model stopped by {finish}; only whole answers are written back")
    wait_until(lambda: _chat(cluster, question).headers["x-unimodel-cache"] == "hit", 20, "the write-back")
    hit = _chat(cluster, question)
    assert hit.headers["x-unimodel-cache-match"] == "exact"
    doc = hit.json()
    assert doc["object"] == "chat.completion" and doc["choices"][0]["message"]["content"] == answer
    assert doc["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    # streamed hit: the same answer as SSE, ending with [DONE]
    client = cluster.client()
    raw = client.chat.completions.with_raw_response.create(
        model=LLM, messages=[{"role": "user", "content": question}], stream=True
    )
    assert raw.headers["x-unimodel-cache"] == "hit" and raw.headers["content-type"].startswith("text/event-stream")
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert text == answer
    # per request off: straight to the model, no cache header
    off = httpx.post(
        f"{cluster.url}/v1/chat/completions", headers={"x-unimodel-cache": "off"},
        json={"model": LLM, "messages": [{"role": "user", "content": question}], "max_tokens": 4}, timeout=120,
    )
    assert off.status_code == 200 and "x-unimodel-cache" not in off.headers
    body_off = _chat(cluster, question, cache=False)
    assert "x-unimodel-cache" not in body_off.headers
    bad = httpx.post(
        f"{cluster.url}/v1/chat/completions", headers={"x-unimodel-cache": "maybe"},
        json={"model": LLM, "messages": [{"role": "user", "content": question}]}, timeout=30,
    )
    assert bad.status_code == 400 and "X-UniModel-Cache" in bad.json()["error"]["message"]


def test_chat_semantic_hit_from_the_modelcache_api(cluster: Cluster) -> None:
    # the chat path and /modelcache share scopes: scope.model is the chat model
    question = "How many legs does a spider have?"
    assert cluster.mc(insert(LLM, (question, "Eight."))).json()["errorCode"] == 0
    r = _chat(cluster, "How many legs do spiders have?")
    assert r.headers["x-unimodel-cache"] == "hit" and r.headers["x-unimodel-cache-match"] == "semantic"
    assert float(r.headers["x-unimodel-cache-similarity"]) > 0.8
    assert r.json()["choices"][0]["message"]["content"] == "Eight."
    metrics = httpx.get(f"http://127.0.0.1:{cluster.cache_metrics}/metrics", timeout=5).text
    assert 'unimodel_cache_queries_total{result="semantic_hit"}' in metrics
    assert "unimodel_cache_stage_seconds_bucket" in metrics
    gw_metrics = httpx.get(f"{cluster.url}/metrics", timeout=5).text
    assert f'unimodel_gateway_cache_lookups_total{{model="{LLM}",outcome="hit"}}' in gw_metrics


# fail-open (last: they stop Milvus and the cache) ----------------------------------------------------
def test_milvus_down_bypasses_and_recovers(cluster: Cluster) -> None:
    assert cluster.milvus is not None
    port, data = cluster.milvus.port, cluster.infra.tmp / "milvus"
    cluster.milvus.stop()
    try:
        r = _chat(cluster, "Tell me a fact about owls.")
        assert r.status_code == 200 and r.headers["x-unimodel-cache"] == "bypassed"
        assert r.json()["choices"][0]["message"]["content"]
        q = cluster.mc(query("mc-down", "Tell me a fact about owls."))
        assert q.status_code == 503 and q.json()["errorCode"] == 202 and "Milvus" in q.json()["errorDesc"]
        w = cluster.mc(insert("mc-down", ("Owls?", "Owls.")))
        assert w.status_code == 503 and w.json()["writeStatus"] == "exception"
    finally:
        cluster.milvus = MilvusLiteServer(port, data, sink=cluster.infra.sink)
        cluster.milvus.start_and_wait()
    # back: the cache reconnects on its own and the earlier entries are still there
    wait_until(lambda: cluster.mc(query("scope-a", "What is the boiling point of water at sea level?")).json().get("cacheHit") is True,
               60, "the cache to reach Milvus again")
    assert cluster.mc(query("mc-down", "Owls?")).json()["cacheHit"] is False  # the failed insert wrote nothing


def test_cache_service_down_bypasses(cluster: Cluster) -> None:
    assert cluster.cache is not None
    cluster.cache.stop()
    started = time.monotonic()
    r = _chat(cluster, "Name a planet.")
    assert r.status_code == 200 and r.headers["x-unimodel-cache"] == "bypassed"
    assert time.monotonic() - started < 60
    q = cluster.mc(query("mc-basic", "Name a planet."))
    assert q.status_code == 503 and q.json()["errorCode"] == 202
