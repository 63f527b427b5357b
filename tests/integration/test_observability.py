"""Traces and metrics of the six services end to end: real nats-server, etcd, Milvus Lite, all-MiniLM-L6-v2
on an embedding-worker, SmolLM2 on llama.cpp on a gpu-worker, every service exporting spans over OTLP/gRPC
to a receiver inside this test and serving /metrics. The gateway is configured by its flags, the other
services by the standard OTEL_* variables alone (exporter, protocol, endpoint, headers).

The span trees of a predict request (HTTP and gRPC) and of a streamed chat request with the semantic
cache on are checked hop by hop: names, parents, services, kinds and attributes. Then every service's
/metrics is scraped for the series the operations docs and the Grafana dashboard use.
"""

from __future__ import annotations

import os
import secrets
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from helpers.deploy_checks import dashboard_metric_names
from helpers.otlp_receiver import OtlpReceiver, Span
from helpers.support import Infra, Services
from unimodel.core.values import to_value
from unimodel.local.procs import MilvusLiteServer, free_port, http_ok, wait_until
from unimodel.v1 import inference_pb2, services_pb2_grpc

EMBEDDER = "all-minilm-l6-v2"
LLM = "smollm2-135m-instruct"
INTERNAL, SERVER, CLIENT, PRODUCER, CONSUMER = 1, 2, 3, 4, 5
ERROR = 2
pytestmark = pytest.mark.timeout(300)


class Cluster:
    def __init__(self, infra: Infra, services: Services, receiver: OtlpReceiver) -> None:
        self.infra, self.services, self.receiver = infra, services, receiver
        self.metrics_ports: dict[str, int] = {}

    @property
    def url(self) -> str:
        return self.services.url

    def scrape(self, service: str) -> str:
        url = f"{self.url}/metrics" if service == "gateway" else f"http://127.0.0.1:{self.metrics_ports[service]}/metrics"
        r = httpx.get(url, timeout=5)
        assert r.status_code == 200, (service, r.status_code)
        return r.text


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_repository: Path) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("observability")
    receiver = OtlpReceiver().start()
    infra = Infra(tmp)
    services = Services(infra)
    c = Cluster(infra, services, receiver)
    milvus = None
    env = {
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # as the SDK's batch span processor: export within 0.2 s
        "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_EXPORTER_OTLP_HEADERS": "x-test-key=secret%20value",
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)  # the services started below inherit them
    try:
        infra.start()
        milvus = MilvusLiteServer(free_port(), tmp / "milvus", sink=infra.sink)
        milvus.start_and_wait()
        tracing = ("--otel-exporter", "otlp-grpc", "--otel-endpoint", receiver.endpoint)  # the gateway's flags

        def start(kind: str, *args: str) -> None:
            c.metrics_ports[kind] = free_port()
            services.start(kind, "--metrics-port", str(c.metrics_ports[kind]), *args)

        start("cache", "--data-dir", str(tmp / "cache"), "--milvus-uri", milvus.uri)
        start("router")
        start("batcher")
        start("embedding-worker", "--instance-id", "embedder-0")
        start("gpu-worker", "--instance-id", "worker-0")
        services.http_port, services.grpc_port = free_port(), free_port()
        gw = services.start(
            "gateway", *tracing, "--http-port", str(services.http_port), "--grpc-port", str(services.grpc_port),
            "--model-repository", str(model_repository), "--load-models", f"{EMBEDDER},{LLM}",
        )
        wait_until(lambda: http_ok(f"{services.url}/health/ready"), 60, "gateway ready", gw)
        services.wait_models([EMBEDDER, LLM])
        yield c
    finally:
        services.stop()
        if milvus is not None:
            milvus.stop()
        infra.stop()
        receiver.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def client_traceparent() -> tuple[str, str, str]:
    """(traceparent, trace id, span id) of a sampled client span."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def one(spans: list[Span], name: str, service: str = "", **attributes: object) -> Span:
    found = [
        s for s in spans
        if s.name == name and (not service or s.service == service)
        and all(s.attributes.get(k) == v for k, v in attributes.items())
    ]
    assert len(found) == 1, f"{len(found)} spans {name!r} ({service or 'any service'}, {attributes}) in {sorted(s.name for s in spans)}"
    return found[0]


BATCH_PATH = ("batcher queue", "batcher dispatch")  # check_batch_path's spans


def has(*names: str) -> object:
    """Every one of `names` among the spans, as often as it is named (spans end, and are exported, at
    different times in different services)."""
    want = Counter(names)
    return lambda spans: not want - Counter(s.name for s in spans)


def check_batch_path(spans: list[Span], parent: Span, model: str, worker_service: str) -> tuple[Span, Span]:
    """batcher queue and dispatch under `parent`, worker batch under dispatch (the batcher sends the batch straight
    to the worker: no router span); the queue span says how long the request waited and in which batch; returns
    (queue, worker batch)."""
    queue = one(spans, "batcher queue", "unimodel-batcher", **{"unimodel.model": model})
    dispatch = one(spans, "batcher dispatch", "unimodel-batcher", **{"unimodel.model": model})
    batch = one(spans, f"worker batch {model}", worker_service)
    assert not [s for s in spans if s.name == "router route"]
    assert queue.parent_id == parent.span_id and queue.kind == CONSUMER
    assert dispatch.parent_id == parent.span_id and dispatch.kind == PRODUCER
    assert batch.parent_id == dispatch.span_id and batch.kind == SERVER
    assert queue.attributes["unimodel.batch.size"] >= 1 and queue.attributes["unimodel.queue.wait_ms"] >= 0
    assert queue.attributes["unimodel.batch.id"] == dispatch.attributes["unimodel.batch.id"]
    assert (dispatch.trace_id, dispatch.span_id) in queue.links and (queue.trace_id, queue.span_id) in dispatch.links
    assert queue.start_ns <= dispatch.start_ns <= batch.start_ns <= batch.end_ns <= dispatch.end_ns
    return queue, batch


def test_predict_over_http_is_one_trace_across_every_hop(cluster: Cluster) -> None:
    traceparent, trace_id, client_span = client_traceparent()
    r = httpx.post(
        f"{cluster.url}/v1/models/echo:predict", json={"input": [1, 2, 3]}, headers={"traceparent": traceparent}, timeout=10
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-unimodel-trace-id"] == trace_id
    spans = cluster.receiver.wait_trace(trace_id, has(
        "POST /v1/models/{model}:predict", "batcher queue", "batcher dispatch", "worker batch echo",
        "infer echo",
    ))
    server = one(spans, "POST /v1/models/{model}:predict", "unimodel-gateway")
    assert server.parent_id == client_span and server.kind == SERVER
    assert server.attributes["http.request.method"] == "POST" and server.attributes["http.response.status_code"] == 200
    assert server.attributes["http.route"] == "/v1/models/{model}:predict" and server.attributes["unimodel.model"] == "echo"
    _queue, batch = check_batch_path(spans, server, "echo", "unimodel-gpu-worker")
    infer = one(spans, "infer echo", "unimodel-gpu-worker")
    assert infer.parent_id == server.span_id and (batch.trace_id, batch.span_id) in infer.links
    assert infer.attributes["unimodel.request_id"] == r.headers["x-request-id"]
    assert server.start_ns <= infer.start_ns <= infer.end_ns <= server.end_ns
    assert {s.service for s in spans} == {"unimodel-gateway", "unimodel-batcher", "unimodel-gpu-worker"}
    # the services but the gateway took exporter and endpoint from the OTEL_* variables alone; all sent the headers
    # (the router's spans: its placement commands, "router place", each a trace of its own)
    sent_by = {name for r in cluster.receiver.requests if r.headers.get("x-test-key") == "secret value" for name in r.services}
    assert {"unimodel-gateway", "unimodel-batcher", "unimodel-router", "unimodel-gpu-worker"} <= sent_by


def test_a_request_without_traceparent_starts_its_own_trace(cluster: Cluster) -> None:
    r = httpx.post(f"{cluster.url}/v1/models/echo:predict", json={"input": "x"}, timeout=10)
    assert r.status_code == 200
    trace_id = r.headers["x-unimodel-trace-id"]
    assert len(trace_id) == 32 and int(trace_id, 16)
    spans = cluster.receiver.wait_trace(trace_id, has("POST /v1/models/{model}:predict", "infer echo"))
    assert one(spans, "POST /v1/models/{model}:predict").parent_id == ""
    # a refused request is traced too: a 404 is the client's error, not the server's (status unset)
    r = httpx.post(f"{cluster.url}/v1/models/nope:predict", json={"input": "x"}, timeout=10)
    assert r.status_code == 404
    spans = cluster.receiver.wait_trace(r.headers["x-unimodel-trace-id"], has("POST /v1/models/{model}:predict"))
    assert [s.attributes["http.response.status_code"] for s in spans] == [404] and spans[0].status != ERROR


def test_predict_over_grpc_returns_the_trace_id_and_is_traced(cluster: Cluster) -> None:
    traceparent, trace_id, client_span = client_traceparent()
    with grpc.insecure_channel(f"127.0.0.1:{cluster.services.grpc_port}") as channel:
        stub = services_pb2_grpc.InferenceServiceStub(channel)
        _reply, call = stub.Predict.with_call(
            inference_pb2.PredictRequest(model="echo", input=to_value([1])), timeout=10,
            metadata=(("traceparent", traceparent),),
        )
    assert dict(call.trailing_metadata())["x-unimodel-trace-id"] == trace_id
    spans = cluster.receiver.wait_trace(trace_id, has("unimodel.v1.InferenceService/Predict", "infer echo", "worker batch echo", *BATCH_PATH))
    server = one(spans, "unimodel.v1.InferenceService/Predict", "unimodel-gateway")
    assert server.parent_id == client_span and server.kind == SERVER
    assert server.attributes["rpc.system"] == "grpc" and server.attributes["rpc.method"] == "Predict"
    check_batch_path(spans, server, "echo", "unimodel-gpu-worker")


def test_streamed_chat_with_the_cache_is_one_trace_across_every_hop(cluster: Cluster) -> None:
    traceparent, trace_id, client_span = client_traceparent()
    body = {
        "model": LLM, "stream": True, "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": f"Name a colour ({trace_id[:6]})."}],
    }
    headers = {"traceparent": traceparent, "x-unimodel-cache": "on"}
    with httpx.stream("POST", f"{cluster.url}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["x-unimodel-trace-id"] == trace_id and r.headers["x-unimodel-cache"] == "miss"
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) > 3
    chat_name, stream_name = f"chat {LLM}", f"stream {LLM}"
    spans = cluster.receiver.wait_trace(trace_id, has(
        "POST /v1/chat/completions", "cache lookup", "cache query", "cache embed", "cache search",
        f"infer {EMBEDDER}", f"worker batch {LLM}", chat_name, stream_name, *BATCH_PATH, *BATCH_PATH,
    ))
    server = one(spans, "POST /v1/chat/completions", "unimodel-gateway")
    assert server.parent_id == client_span and server.attributes["http.response.status_code"] == 200

    # the cache lookup: gateway -> cache service -> the embedding (through the batcher to the embedding-worker)
    lookup = one(spans, "cache lookup", "unimodel-gateway")
    query = one(spans, "cache query", "unimodel-cache")
    embed = one(spans, "cache embed", "unimodel-cache")
    search = one(spans, "cache search", "unimodel-cache")
    assert lookup.parent_id == server.span_id and lookup.kind == CLIENT and lookup.attributes["unimodel.cache.outcome"] == "miss"
    assert query.parent_id == lookup.span_id and query.kind == SERVER and query.attributes["unimodel.cache.outcome"] == "miss"
    assert embed.parent_id == query.span_id and search.parent_id == query.span_id
    assert embed.end_ns <= search.start_ns <= search.end_ns <= query.end_ns <= lookup.end_ns
    check_batch_path(spans, embed, EMBEDDER, "unimodel-embedding-worker")
    assert one(spans, f"infer {EMBEDDER}", "unimodel-embedding-worker").parent_id == embed.span_id

    # the generation: batcher -> router -> worker, the GenAI span on the worker, streaming at the gateway
    check_batch_path(spans, server, LLM, "unimodel-gpu-worker")
    chat = one(spans, chat_name, "unimodel-gpu-worker")
    assert chat.parent_id == server.span_id
    a = chat.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == LLM and a["gen_ai.response.model"] == LLM
    assert a["gen_ai.provider.name"] == "unimodel" and a["gen_ai.request.max_tokens"] == 8
    assert a["gen_ai.request.temperature"] == 0 and a["gen_ai.usage.input_tokens"] > 5
    assert 0 < a["gen_ai.usage.output_tokens"] <= 8 and a["gen_ai.response.finish_reasons"][0] in ("stop", "length")
    assert 0 < a["gen_ai.server.time_to_first_token"] < (chat.end_ns - chat.start_ns) / 1e9
    stream = one(spans, stream_name, "unimodel-gateway")
    assert stream.parent_id == server.span_id
    assert stream.attributes["gen_ai.usage.output_tokens"] == a["gen_ai.usage.output_tokens"]
    assert stream.attributes["unimodel.stream.chunks"] >= 1 and stream.attributes["gen_ai.server.time_to_first_token"] > 0
    assert lookup.end_ns <= chat.start_ns and chat.end_ns <= server.end_ns and stream.end_ns <= server.end_ns
    assert all(s.trace_id == trace_id for s in spans)


def test_embeddings_request_is_traced(cluster: Cluster) -> None:
    r = httpx.post(f"{cluster.url}/v1/embeddings", json={"model": EMBEDDER, "input": ["a", "b"]}, timeout=30)
    assert r.status_code == 200, r.text
    spans = cluster.receiver.wait_trace(r.headers["x-unimodel-trace-id"], has("POST /v1/embeddings", f"infer {EMBEDDER}", *BATCH_PATH))
    server = one(spans, "POST /v1/embeddings", "unimodel-gateway")
    check_batch_path(spans, server, EMBEDDER, "unimodel-embedding-worker")


def test_a_modelcache_query_is_one_trace_from_the_gateway_to_the_cache(cluster: Cluster) -> None:
    """POST /modelcache: the gateway's server span is the parent of the cache service's query span (and its
    embedding call), as for a chat's cache lookup."""
    body = {"type": "query", "scope": {"model": "observability"}, "query": "Is anyone tracing this question?"}
    r = httpx.post(f"{cluster.url}/modelcache", json=body, timeout=30)
    assert r.status_code == 200 and r.json()["errorCode"] == 0, r.text
    spans = cluster.receiver.wait_trace(r.headers["x-unimodel-trace-id"], has("POST /modelcache", "cache query", "cache embed"))
    server = one(spans, "POST /modelcache", "unimodel-gateway")
    query = one(spans, "cache query", "unimodel-cache")
    embed = one(spans, "cache embed", "unimodel-cache")
    assert query.parent_id == server.span_id and query.kind == SERVER
    assert embed.parent_id == query.span_id


COMMON = ("unimodel_service_info", "unimodel_nats_connected", "unimodel_etcd_connected", "unimodel_inflight_requests")
EXPECTED = {
    "gateway": (
        "unimodel_gateway_requests_total", "unimodel_gateway_request_duration_seconds_bucket",
        "unimodel_gateway_cache_lookups_total", "unimodel_gateway_time_to_first_token_seconds_bucket",
        "unimodel_gateway_inter_token_latency_seconds_bucket", "unimodel_gateway_output_tokens_total",
    ),
    "batcher": (
        "unimodel_batcher_queue_depth", "unimodel_batcher_inflight_batches", "unimodel_batcher_batch_rows_bucket",
        "unimodel_batcher_queue_wait_seconds_bucket", "unimodel_batcher_batch_fill_ratio_bucket",
        "unimodel_batcher_batches_total", "unimodel_batcher_dispatched_total", "unimodel_batcher_decision_seconds_bucket",
        "unimodel_batcher_dispatch_seconds_bucket",
    ),
    "router": ("unimodel_router_decision_seconds_bucket", "unimodel_router_workers"),
    "gpu-worker": (
        "unimodel_worker_batches_total", "unimodel_worker_batch_duration_seconds_bucket",
        "unimodel_worker_inflight_batches", "unimodel_worker_capacity", "unimodel_worker_models",
        "unimodel_worker_generations_total", "unimodel_worker_generated_tokens_total",
        "unimodel_worker_time_to_first_token_seconds_bucket", "unimodel_worker_inter_token_latency_seconds_bucket",
        "unimodel_worker_tokens_per_second_bucket",
    ),
    "embedding-worker": (
        "unimodel_worker_batches_total", "unimodel_worker_batch_duration_seconds_bucket", "unimodel_worker_models",
    ),
    "cache": ("unimodel_cache_queries_total", "unimodel_cache_stage_seconds_bucket", "unimodel_cache_entries"),
}


def samples(text: str) -> dict[str, list[str]]:
    """metric sample name -> its sample lines."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            out.setdefault(line.split("{", 1)[0].split(" ", 1)[0], []).append(line)
    return out


def declared(text: str) -> set[str]:
    """Sample names a /metrics page declares (a labelled series with no child yet has only its # TYPE)."""
    names = set(samples(text))
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.update([name, *(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count") if kind == "histogram")])
    return names


def test_every_service_serves_its_metrics_after_one_request_of_each_kind(cluster: Cluster) -> None:
    # the requests above ran (predict, gRPC predict, streamed chat with the cache, embeddings)
    for service, names in EXPECTED.items():
        found = samples(cluster.scrape(service))
        for name in (*COMMON, *names):
            assert name in found, f"{service}: {name} missing from /metrics"
        assert any(f'service="{service}"' in line for line in found["unimodel_service_info"]), service
        assert found["unimodel_nats_connected"] == ["unimodel_nats_connected 1.0"], service
        assert found["unimodel_etcd_connected"] == ["unimodel_etcd_connected 1.0"], service
    gateway = samples(cluster.scrape("gateway"))
    assert any('outcome="miss"' in line for line in gateway["unimodel_gateway_cache_lookups_total"])
    assert any(f'model="{LLM}"' in line for line in gateway["unimodel_gateway_output_tokens_total"])
    worker = samples(cluster.scrape("gpu-worker"))
    assert any('state="READY"' in line for line in worker["unimodel_worker_models"])
    assert any(f'model="{LLM}"' in line and not line.endswith(" 0.0") for line in worker["unimodel_worker_generated_tokens_total"])
    batcher = samples(cluster.scrape("batcher"))
    assert any('outcome="ok"' in line for line in batcher["unimodel_batcher_dispatched_total"])
    router = samples(cluster.scrape("router"))
    assert any('state="ready"' in line and line.endswith(" 2.0") for line in router["unimodel_router_workers"])
    # every metric the Grafana dashboard charts is one the services really export
    exported = set().union(*(declared(cluster.scrape(service)) for service in EXPECTED))
    assert dashboard_metric_names() - exported == set()
