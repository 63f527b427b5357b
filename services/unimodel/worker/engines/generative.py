"""Text-generation engines behind one interface (plain logic, no transport).

A :class:`GenerativeEngine` is an :class:`Engine` that generates instead of running tensor batches:

- ``prepare(request, request_id)`` renders the prompt (chat template for messages, the raw prompt for
  completions), counts its tokens and checks the model's limits: a :class:`Prompt`, or
  ``errors.InvalidArgument`` naming the limit. Cheap enough to run for every item of a batch before
  any of them starts.
- ``generate(prompt)`` is an async iterator of :class:`Delta`: text as it is produced, with the tokens
  it took; the last one has ``finish_reason`` (``stop`` or ``length``) and the completion's token count.
  Leaving the iteration early (``aclose()``, or cancelling the task that iterates) aborts the generation
  in the engine: its resources are freed and ``aborted`` counts it.
- ``metadata()``: tokenizer, chat template and context length, for the model's status.

Engines: ``llamacpp`` (llama-cpp-python, GGUF on CPU), ``vllm`` (in-process AsyncLLM, GPU) and
``openai`` (an upstream OpenAI-compatible server). CPU-bound work never runs on the event loop.
"""

from __future__ import annotations

import abc
import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np

from unimodel.core import errors
from unimodel.v1 import generate_pb2, model_pb2
from unimodel.worker.engines.engine import Engine

T = TypeVar("T")

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"
FINISH_ERROR = "error"


@dataclass(slots=True)
class Prompt:
    """A request ready to generate (what `prepare` returns and `generate` takes)."""

    request_id: str
    text: str  # the rendered prompt (chat template applied)
    prompt_tokens: int
    max_tokens: int  # resolved: the request's, or the model's default, within the context left
    sampling: generate_pb2.SamplingParams
    stop: list[str] = field(default_factory=list)  # the request's stop strings plus the template's
    tokens: list[int] | None = None  # engine-specific tokenization, when the engine made one
    engine_state: Any = None  # anything else the engine wants to carry from prepare to generate
    # A continuation (GenerateRequest.continuation: the generation moved here from a lost worker): the
    # answer's tokens so far (already appended to `tokens`) and the text of them the client has.
    # prompt_tokens counts the original prompt only; max_tokens is what is left.
    continued_ids: list[int] = field(default_factory=list)
    continued_text: str = ""


@dataclass(slots=True)
class Delta:
    text: str = ""
    tokens: int = 0  # tokens generated for this delta
    finish_reason: str = ""  # set on the last delta only
    completion_tokens: int = 0  # on the last delta: tokens generated in all
    prompt_tokens: int = 0  # on the last delta, from engines that learn the count only then (openai); else 0
    token_ids: list[int] = field(default_factory=list)  # the ids of `tokens`, from engines that can resume


class GenerativeEngine(Engine):
    """Base of the text-generation engines (see the module doc)."""

    generative: ClassVar[bool] = True
    takes_values: ClassVar[bool] = True  # no tensor pre/post-processing
    resumes: ClassVar[bool] = False  # takes GenerateRequest.continuation and reports Delta.token_ids

    def __init__(self, config: model_pb2.ModelConfig) -> None:
        super().__init__(config)
        self.aborted = 0  # generations stopped because the caller left (tests and metrics read it)

    @abc.abstractmethod
    async def prepare(self, request: generate_pb2.GenerateRequest, request_id: str) -> Prompt: ...

    @abc.abstractmethod
    def generate(self, prompt: Prompt) -> AsyncIterator[Delta]: ...

    def metadata(self) -> dict[str, str]:
        return {}

    async def infer(self, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        raise errors.InvalidArgument(
            f"model {self.config.name!r} generates text: use /v1/chat/completions or /v1/completions",
            model=self.config.name,
        )


async def under_lock(lock: threading.Lock, fn: Callable[[], T], *, inline: bool) -> T:
    """``fn()`` holding ``lock`` (a tokenizer that must not run in two threads at once). With ``inline``
    (a short input: well under a millisecond) and the lock free at once, on the event loop; otherwise in
    a thread, which waits for the lock there, so the loop never blocks."""
    if inline and lock.acquire(blocking=False):
        try:
            return fn()
        finally:
            lock.release()

    def locked() -> T:
        with lock:
            return fn()

    return await asyncio.to_thread(locked)


# limits: the rules of every engine and the gateway are core.generation_rules's --------------------------------
def context_length(config: model_pb2.ModelConfig, engine_default: int) -> int:
    return config.llm.context_length or engine_default


def max_tokens_cap(config: model_pb2.ModelConfig, context: int) -> int:
    return config.llm.max_tokens or context


def continued(prompt: Prompt, continuation: generate_pb2.Continuation, vocab_size: int) -> Prompt:
    """`prompt` (prepared from the original request) continuing the answer `continuation` holds: its
    tokens appended to the prompt's, max_tokens and min_tokens less the tokens already generated (an
    answer that reached max_tokens gets 0: the engine only sends the text still held). Token ids outside
    the vocabulary are refused (a worker may be reached directly)."""
    ids = list(continuation.token_ids)
    if any(not 0 <= t < vocab_size for t in ids):
        raise errors.InvalidArgument(
            f"continuation.token_ids: ids must lie in 0..{vocab_size - 1} (the model's vocabulary)",
            field="continuation.token_ids",
        )
    sampling = generate_pb2.SamplingParams()
    sampling.CopyFrom(prompt.sampling)
    sampling.min_tokens = max(0, sampling.min_tokens - len(ids))
    prompt.sampling = sampling
    prompt.tokens = [*(prompt.tokens or []), *ids]
    prompt.max_tokens = max(0, prompt.max_tokens - len(ids))
    prompt.continued_ids = ids
    prompt.continued_text = continuation.text
    return prompt


def held_text(prompt: Prompt, full: str) -> str:
    """The text of the continued answer the client did not get yet: `full` (the text of
    prompt.continued_ids, decoded as the engine decodes its output) after the part the client has. ""
    when that part is not a prefix of `full` (then nothing is repeated, at worst a held piece is lost)."""
    done = prompt.continued_text
    return full[len(done):] if full.startswith(done) else ""


def chat_messages(request: generate_pb2.GenerateRequest) -> list[dict[str, str]]:
    """The conversation as the dicts chat templates take (`developer` is rendered as `system`)."""
    out = []
    for m in request.messages:
        d = {"role": "system" if m.role == "developer" else m.role, "content": m.content}
        if m.name:
            d["name"] = m.name
        out.append(d)
    return out
