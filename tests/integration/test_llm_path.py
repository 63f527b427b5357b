"""LLM serving end to end: the official openai SDK and gRPC against the gateway, through batcher and router,
to two gpu-workers running SmolLM2-135M-Instruct on llama.cpp (real nats-server, etcd, services).

One cluster per module (starting it and loading the model costs seconds); every test leaves it healthy.
A second gateway with API keys joins the same cluster for the auth tests.
"""

from __future__ import annotations

import asyncio
import io
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import nats
import openai
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helpers.support import Infra, Services, metric_total
from unimodel.local.procs import ManagedProcess, free_port, http_ok, wait_until
from unimodel.v1 import generate_pb2, inference_pb2, services_pb2_grpc

MODEL = "smollm2-135m-instruct"
pytestmark = pytest.mark.timeout(300)


class Cluster:
    def __init__(self, infra: Infra, services: Services, metrics_ports: list[int]) -> None:
        self.infra, self.services, self.metrics_ports = infra, services, metrics_ports
        self.url = services.url
        self.auth_url = ""
        self.auth_grpc = ""
        self.models_root = Path()

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60, **kw)

    def worker_metric(self, name: str, **labels: str) -> float:
        """Sum of a worker counter over both workers (Prometheus text format)."""
        return sum(metric_total(f"http://127.0.0.1:{port}/metrics", name, **labels) for port in self.metrics_ports)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_repository: Path) -> Iterator[Cluster]:
    infra = Infra(tmp_path_factory.mktemp("llm"))
    services = Services(infra)
    try:
        infra.start()
        ports = [free_port(), free_port()]
        services.start("router")
        services.start("batcher")
        for i, port in enumerate(ports):
            services.start(
                "gpu-worker", "--instance-id", f"worker-{i}", "--metrics-port", str(port), "--upstream-urls", "http://127.0.0.1",
                name=f"worker-{i}",
            )  # fmt: skip
        services.http_port, services.grpc_port = free_port(), free_port()
        models_root = tmp_path_factory.mktemp("models-root")  # folders registered by path (upstream model)
        gw = services.start(
            "gateway", "--http-port", str(services.http_port), "--grpc-port", str(services.grpc_port),
            "--model-repository", str(model_repository), "--load-models", MODEL, "--models-root", str(models_root),
            "--upstream-urls", "http://127.0.0.1",  # the upstream model's server runs on loopback
        )
        wait_until(lambda: http_ok(f"{services.url}/health/ready"), 60, "gateway ready", gw)
        services.wait_models([MODEL], instances=2)
        c = Cluster(infra, services, ports)
        c.models_root = models_root
        # the gateway with API keys (same cluster): keys and tenants from its config file
        config = tmp_path_factory.mktemp("auth") / "gateway.yaml"
        config.write_text("api_keys:\n  sk-team-a: team-a\n  sk-team-b: team-b\n")
        auth_port, auth_grpc = free_port(), free_port()
        auth_gw = services.start(
            "gateway", "--http-port", str(auth_port), "--grpc-port", str(auth_grpc), "--config", str(config),
            name="gateway-auth",
        )
        wait_until(lambda: http_ok(f"http://127.0.0.1:{auth_port}/health/ready"), 60, "auth gateway ready", auth_gw)
        c.auth_url = f"http://127.0.0.1:{auth_port}"
        c.auth_grpc = f"127.0.0.1:{auth_grpc}"
        yield c
    finally:
        services.stop()
        infra.stop()


CHAT = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


# the openai SDK, unchanged -------------------------------------------------------------------------
def test_openai_sdk_chat_blocking_and_streamed(cluster: Cluster) -> None:
    client = cluster.client()
    assert MODEL in [m.id for m in client.models.list()]
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0, seed=1)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens > 10 and 0 < whole.usage.completion_tokens <= 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert whole.id.startswith("chatcmpl-") and whole.model == MODEL

    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=12, temperature=0, seed=1, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # greedy decoding: the streamed text is the blocking one, token for token
    assert text == choice.message.content


def test_openai_sdk_async_and_multi_turn(cluster: Cluster) -> None:
    async def main() -> None:
        client = openai.AsyncOpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0, timeout=60)
        try:
            turns = [*CHAT, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}]
            reply = await client.chat.completions.create(model=MODEL, messages=turns, max_tokens=8, temperature=0)
            assert reply.choices[0].message.content
            first = await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
            assert reply.usage.prompt_tokens > first.usage.prompt_tokens  # the whole conversation was rendered
            parts = []
            async for chunk in await client.chat.completions.create(
                model=MODEL, messages=turns, max_tokens=8, temperature=0, stream=True
            ):
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
            assert "".join(parts) == reply.choices[0].message.content
        finally:
            await client.close()

    asyncio.run(main())


def test_completions_and_sampling_parameters(cluster: Cluster) -> None:
    client = cluster.client()
    done = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert done.object == "text_completion" and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 6
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True
        ) if c.choices
    )
    assert streamed == done.choices[0].text
    # the same seed samples the same text; a stop string ends the text before it
    kw = dict(model=MODEL, messages=CHAT, max_tokens=10, temperature=1.0, top_p=0.9, seed=1234)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b
    base = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0).choices[0]
    word = base.message.content.split()[-1] if base.message.content.split() else ""
    if len(base.message.content.split()) >= 2:
        stopped = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0, stop=[word])
        assert word not in stopped.choices[0].message.content
        assert stopped.choices[0].finish_reason == "stop"


# bad input: clear 4xx in OpenAI's shape, worker stays healthy ---------------------------------------
BAD = [
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 42}]}, 400, "messages[0].content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": {"a": 1}}]}, 400, "messages[0].content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**12}, 400, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, 400, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 2.5}, 400, "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "min_tokens": -1}, 400, "min_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "min_tokens": 9}, 400, "min_tokens"),
    ({"model": MODEL, "messages": [{"role": "system", "content": "only a system prompt"}]}, 400, "messages"),
    ({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, 404, None),
    ({"model": "echo", "messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD)
def test_bad_requests_get_openai_errors(cluster: Cluster, body: dict, status: int, param: str | None) -> None:
    r = httpx.post(f"{cluster.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    assert error["param"] == param


def test_malformed_json_and_limits(cluster: Cluster) -> None:
    r = httpx.post(f"{cluster.url}/v1/chat/completions", content=b"{not json", timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    # the model's prompt cap (max_prompt_tokens 1536) is named in the answer, blocking and streamed alike
    long = "word " * 3000
    for stream in (False, True):
        r = httpx.post(f"{cluster.url}/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": [{"role": "user", "content": long}], "max_tokens": 4, "stream": stream,
        })
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "max_prompt_tokens" and "max_prompt_tokens" in r.json()["error"]["message"]
    # the openai SDK raises its typed errors
    with pytest.raises(openai.NotFoundError):
        cluster.client().chat.completions.create(model="nope", messages=CHAT)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        cluster.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4096)
    ok = cluster.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3)
    assert ok.choices[0].message.content is not None


# aborts and deadlines ------------------------------------------------------------------------------
def test_client_that_leaves_mid_stream_aborts_the_generation_in_the_engine(cluster: Cluster) -> None:
    before = cluster.worker_metric("unimodel_worker_generations_total", finish_reason="abort")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
            "max_tokens": 900, "temperature": 0.8, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{cluster.url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                seen += 1
            if seen >= 4:
                break  # leave: the connection closes with the stream
    wait_until(
        lambda: cluster.worker_metric("unimodel_worker_generations_total", finish_reason="abort") > before,
        15, "the worker reports the aborted generation",
    )
    tokens = cluster.worker_metric("unimodel_worker_generated_tokens_total")
    time.sleep(1.0)  # nothing generates any more for the client that left
    assert cluster.worker_metric("unimodel_worker_generated_tokens_total") == tokens
    # the worker is healthy: the next request is served at once
    reply = cluster.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
    assert reply.choices[0].message.content is not None


def test_grpc_generate_streamed_unary_cancelled_and_deadline(cluster: Cluster) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{cluster.services.grpc_port}")
    stub = services_pb2_grpc.InferenceServiceStub(channel)
    request = generate_pb2.GenerateRequest(model=MODEL, messages=[generate_pb2.ChatMessage(**m) for m in CHAT])
    request.sampling.max_tokens = 10
    request.sampling.temperature = 0
    chunks = list(stub.Generate(request, timeout=60))
    assert [c.seq for c in chunks] == list(range(len(chunks)))  # in order, none lost or repeated
    assert chunks[0].usage.prompt_tokens > 0 and chunks[0].path[0].startswith("gateway-")
    assert chunks[0].path[-1] == chunks[0].worker_id  # gateway, batcher, router, worker
    assert chunks[-1].finish_reason in ("stop", "length")
    unary = stub.GenerateUnary(request, timeout=60)
    assert unary.text == "".join(c.text for c in chunks)
    assert unary.usage.completion_tokens == chunks[-1].usage.completion_tokens
    # a cancelled call aborts the generation
    before = cluster.worker_metric("unimodel_worker_generations_total", finish_reason="abort")
    # greedy on this prompt: ~1500 tokens (~30 s here), so neither the cancel nor the 1 s deadline below can
    # race with the model's own end of sequence (a sampled "Tell a long story." sometimes ended within 1 s)
    long = generate_pb2.GenerateRequest(model=MODEL, messages=[
        generate_pb2.ChatMessage(role="user", content="Write a very long story about a dragon, with many chapters.")])
    long.sampling.max_tokens = 900
    long.sampling.temperature = 0
    call = stub.Generate(long, timeout=60)
    for i, _chunk in enumerate(call):
        if i >= 3:
            call.cancel()
            break
    wait_until(
        lambda: cluster.worker_metric("unimodel_worker_generations_total", finish_reason="abort") > before,
        15, "the worker aborts the cancelled call's generation",
    )
    # a deadline ends the generation with DEADLINE_EXCEEDED
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(long, timeout=1.0))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # bad input over gRPC: INVALID_ARGUMENT with the reason
    bad = generate_pb2.GenerateRequest(model=MODEL)
    with pytest.raises(grpc.RpcError) as caught:
        stub.GenerateUnary(bad, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "messages" in caught.value.details()
    channel.close()


# an upstream OpenAI-compatible server as a model of ours ---------------------------------------------
UPSTREAM_SERVER = Path(__file__).resolve().parents[2] / "scripts" / "bench" / "llama_cpp_server.py"


def test_an_upstream_server_registered_as_a_model_streams_through_the_cluster(cluster: Cluster, model_repository: Path) -> None:
    """llama-cpp-python's own OpenAI server on the demo GGUF, registered with POST /v1/models as an `openai`
    engine model: the openai SDK streams from it through gateway, batcher, router and worker."""
    gguf = (model_repository / MODEL / "model.gguf").resolve()
    port = free_port()
    upstream = ManagedProcess("upstream", [
        sys.executable, str(UPSTREAM_SERVER), "--model", str(gguf), "--model_alias", "smol-upstream",
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "1",
        "--n_threads_batch", "1", "--interrupt_requests", "False", "--verbose", "False",
    ], sink=io.StringIO())  # fmt: skip
    folder = cluster.models_root / "upstream"
    folder.mkdir(exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "name": "upstream-smollm2", "engine": "openai", "max_batch_size": 8,
        "llm": {"upstream_url": f"http://127.0.0.1:{port}/v1", "upstream_model": "smol-upstream",
                "max_tokens": 512, "max_sequences": 4},
    }))  # fmt: skip
    try:
        upstream.start()
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/v1/models"), 120, "llama_cpp.server", upstream)
        r = httpx.post(f"{cluster.url}/v1/models", json={"path": "upstream"}, timeout=30)
        assert r.status_code == 202, r.text  # accepted: the workers load it
        cluster.services.wait_models(["upstream-smollm2"], instances=2)
        assert "upstream-smollm2" in {m.id for m in cluster.client().models.list()}
        direct = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
            "messages": CHAT, "max_tokens": 16, "temperature": 0})  # fmt: skip
        assert direct.status_code == 200, direct.text
        ours = cluster.client().chat.completions.create(
            model="upstream-smollm2", messages=CHAT, max_tokens=16, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(ours)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text and text == direct.json()["choices"][0]["message"]["content"]
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == [direct.json()["choices"][0]["finish_reason"]]
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens == direct.json()["usage"]["completion_tokens"]
        # over the model's own cap: refused by us, before the upstream is asked
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            cluster.client().chat.completions.create(model="upstream-smollm2", messages=CHAT, max_tokens=600)
        # the upstream goes away: 503 in OpenAI's shape, never a 500
        upstream.stop()
        r = httpx.post(f"{cluster.url}/v1/chat/completions", timeout=60, json={
            "model": "upstream-smollm2", "messages": CHAT, "max_tokens": 4})  # fmt: skip
        assert r.status_code == 503, r.text
        assert r.json()["error"]["message"] and "retry-after" in r.headers
    finally:
        upstream.stop()
        httpx.delete(f"{cluster.url}/v1/models/upstream-smollm2", timeout=30)


# routing -------------------------------------------------------------------------------------------
def test_one_conversation_keeps_its_worker(cluster: Cluster) -> None:
    def worker_of(user: str, turns: list[dict[str, str]]) -> str:
        r = httpx.post(f"{cluster.url}/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": turns, "max_tokens": 2, "user": user,
        })
        assert r.status_code == 200, r.text
        return r.headers["x-unimodel-worker"]

    def idle() -> bool:  # what earlier tests left running (an aborted long generation) has ended
        r = httpx.get(f"{cluster.url}/v1/models/{MODEL}/status", timeout=5)
        return r.status_code == 200 and all(i["inflight"] == 0 for i in r.json()["instances"])

    # a home with no free sequence slot hands a turn to another worker (core/routing_policy.py): start idle
    wait_until(idle, 60, "both workers idle")
    homes = {worker_of("alice", CHAT) for _ in range(4)}
    assert len(homes) == 1  # one session, one worker
    # with no `user`, the conversation's start is the key: later turns go where the first one went
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    first = worker_of("", convo)
    later = worker_of("", [*convo, {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}])
    assert later == first
    # different sessions spread over both workers
    assert len({worker_of(f"user-{i}", CHAT) for i in range(12)}) == 2


# API keys and tenants -------------------------------------------------------------------------------
def test_api_keys_and_the_tenant_travels_to_every_service(cluster: Cluster) -> None:
    url = cluster.auth_url
    assert httpx.get(f"{url}/health/ready", timeout=5).status_code == 200  # health needs no key
    for headers in ({}, {"authorization": "Bearer sk-wrong"}):
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": CHAT}, headers=headers, timeout=10)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{url}/v1/models", headers=headers, timeout=5).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0).models.list()

    async def watch() -> tuple[list[str], list[str]]:
        nc = await nats.connect(cluster.infra.nats.url)
        to_batcher: list[str] = []
        to_worker: list[str] = []

        async def on_item(msg) -> None:
            to_batcher.append(inference_pb2.BatchItem.FromString(msg.data).tenant)

        async def on_batch(msg) -> None:
            batch = inference_pb2.BatchRequest.FromString(msg.data)
            to_worker.extend(i.tenant for i in batch.items if i.HasField("generate"))

        await nc.subscribe("unimodel.v1.batch.>", cb=on_item)
        await nc.subscribe("unimodel.v1.worker.*.infer", cb=on_batch)
        await nc.flush()
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-team-a", max_retries=0, timeout=60)
        try:
            reply = await client.chat.completions.create(
                model=MODEL, messages=CHAT, max_tokens=2, extra_headers={"x-unimodel-tenant": "team-b"}
            )
            assert reply.choices[0].message.content is not None
        finally:
            await client.close()
        await nc.flush()
        await asyncio.sleep(0.2)
        await nc.close()
        return to_batcher, to_worker

    to_batcher, to_worker = asyncio.run(watch())
    assert to_batcher == ["team-a"]  # the key decides the tenant, not a header the client sends
    assert to_worker == ["team-a"]
    # gRPC: the same keys; health needs none
    with grpc.insecure_channel(cluster.auth_grpc) as channel:
        stub = services_pb2_grpc.InferenceServiceStub(channel)
        request = generate_pb2.GenerateRequest(model=MODEL, messages=[generate_pb2.ChatMessage(**m) for m in CHAT])
        request.sampling.max_tokens = 2
        for metadata in ((), (("authorization", "Bearer sk-wrong"),)):
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Generate(request, timeout=10, metadata=metadata))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as caught:
                stub.GenerateUnary(request, timeout=10, metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = stub.GenerateUnary(request, timeout=60, metadata=(("authorization", "Bearer sk-team-b"),))
        assert reply.usage.completion_tokens > 0
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


# last in this module: it kills a worker --------------------------------------------------------------
def test_a_generation_whose_worker_dies_moves_to_the_other_worker(cluster: Cluster) -> None:
    """No wait for --generate-timeout-s: the gateway sees the worker's process gone (NATS has no responder
    on its liveness subject) and continues the generation on the other worker (mid-stream migration): the
    gRPC stream goes on with the same greedy text, sequence numbers and usage of an uninterrupted run.
    (tests/integration/test_stream_migration.py covers the OpenAI API, no worker left, migration off.)"""
    with grpc.insecure_channel(f"127.0.0.1:{cluster.services.grpc_port}") as channel:
        stub = services_pb2_grpc.InferenceServiceStub(channel)
        long = generate_pb2.GenerateRequest(model=MODEL, messages=[
            generate_pb2.ChatMessage(role="user", content="Write a very long story about a dragon, with many chapters.")])
        long.sampling.max_tokens = 120
        long.sampling.temperature = 0
        reference = stub.GenerateUnary(long, timeout=120)
        call = stub.Generate(long, timeout=120)
        first = next(call)
        chunks = [next(call)]
        assert chunks[0].text  # it streams
        (victim,) = [p for p in cluster.services.procs if p.name == first.worker_id]
        victim.kill()
        killed = time.monotonic()
        chunks += list(call)
        ended_s = time.monotonic() - killed
    assert "".join(c.text for c in chunks) == reference.text
    assert [c.seq for c in chunks] == list(range(1, len(chunks) + 1))  # numbered on across the move
    assert chunks[-1].finish_reason == reference.finish_reason and chunks[-1].usage == reference.usage
    assert ended_s < 60, ended_s
    # the other worker still serves the model
    reply = cluster.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
    assert reply.choices[0].message.content is not None
