"""Engines behind one interface. The worker's runtime only sees :class:`Engine`.

An engine runs one model (one :class:`ModelConfig`) on a whole, already concatenated batch:
``infer({input name: array with the batch dimension}, [output names]) -> {output name: array}``.
Checking, concatenating and splitting requests is the runner's job (batching.py), pre/post-processing
is processing.py's. Engines here: ``onnx`` (ONNX Runtime, onnx_engine.py), ``delay`` (waits, then
echoes: a load-test engine that uses no CPU) and ``echo`` (the built-in test model; it also takes
predict-API values as they are).
"""

from __future__ import annotations

import abc
import asyncio
import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from google.protobuf import struct_pb2

from unimodel.core import errors
from unimodel.v1 import model_pb2


_KIND_NAMES = {int: "an integer", float: "a number"}


def engine_option(
    config: model_pb2.ModelConfig,
    key: str,
    kind: type,
    default: Any,
    *,
    minimum: float | None = None,
    positive: bool = False,
) -> Any:
    """``options.<key>`` of the model as ``kind`` (int, float, str, or bool written "0"/"1"/"true"/"false"),
    ``default`` when unset or empty; a value that does not parse or is out of range is an InvalidArgument
    naming the option. ``minimum``: the value must be >= it; ``positive``: > 0."""
    raw = config.options.get(key, "")
    if not raw:
        return default
    where = f"model {config.name!r}: options.{key}"
    if kind is bool:
        if raw not in ("0", "1", "true", "false"):
            raise errors.InvalidArgument(f"{where} must be 0 or 1")
        return raw in ("1", "true")
    if kind is str:
        return raw
    try:
        value = kind(raw)
    except ValueError:
        raise errors.InvalidArgument(f"{where} {raw!r} is not {_KIND_NAMES.get(kind, kind.__name__)}") from None
    if minimum is not None and value < minimum:
        raise errors.InvalidArgument(f"{where} must be >= {minimum}")
    if positive and value <= 0:
        raise errors.InvalidArgument(f"{where} must be > 0")
    return value


class Engine(abc.ABC):
    """Runs one model. ``load`` before the first ``infer``; ``unload`` frees its resources."""

    kind: ClassVar[str] = "engine"
    # True: predict-API values go to `infer_values` as they are, with no pre/post-processing.
    takes_values: ClassVar[bool] = False
    # True: a text-generation engine (llm.GenerativeEngine): batches of GenerateRequests, streamed answers.
    generative: ClassVar[bool] = False

    def __init__(self, config: model_pb2.ModelConfig) -> None:
        self.config = config
        self.model = config.name

    @property
    def concurrency(self) -> int:
        """Batches the engine runs at once; 0 = no limit of its own (the worker's slots apply)."""
        return 0

    async def load(self) -> None:
        """Load weights / create sessions (off the event loop when it blocks)."""

    async def unload(self) -> None:
        """Release the model's resources. Called once no batch runs on the engine any more."""

    @abc.abstractmethod
    async def infer(self, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Run one batch: every input carries the batch dimension (when the model batches); return
        the requested outputs with the same number of rows."""

    async def infer_values(self, values: Sequence[struct_pb2.Value]) -> list[struct_pb2.Value]:
        """Predict-API values in, one output value per input (engines with ``takes_values``)."""
        raise errors.Internal(f"the {self.kind} engine does not take values")


def _first_to_first(config: model_pb2.ModelConfig, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
    """Input i returned as output i (echo-style engines)."""
    pairs = {o.name: i.name for i, o in zip(config.inputs, config.outputs)}
    out: dict[str, np.ndarray] = {}
    for name in outputs:
        source = pairs.get(name)
        if source is None:
            raise errors.InvalidArgument(f"model {config.name!r}: output {name!r} has no matching input to echo")
        out[name] = inputs[source]
    return out


class EchoEngine(Engine):
    """Returns its inputs: the built-in test model that exercises the whole path."""

    kind = "echo"
    takes_values = True

    async def infer(self, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        return _first_to_first(self.config, inputs, outputs)

    async def infer_values(self, values: Sequence[struct_pb2.Value]) -> list[struct_pb2.Value]:
        return list(values)


class DelayEngine(Engine):
    """Waits ``options.delay_ms`` per batch (asyncio sleep: no CPU, no thread), then returns INPUT0 as
    OUTPUT0 (input i as output i). Stands in for an accelerator-bound model in load tests."""

    kind = "delay"

    def __init__(self, config: model_pb2.ModelConfig) -> None:
        super().__init__(config)
        self.delay_s = engine_option(config, "delay_ms", float, 0.0) / 1000.0
        if not 0 <= self.delay_s <= 3600:
            raise errors.InvalidArgument(f"model {config.name!r}: options.delay_ms must be within 0..3600000")

    async def infer(self, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return _first_to_first(self.config, inputs, outputs)


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def _available() -> tuple[str, ...]:
    kinds = []
    if _importable("onnxruntime"):
        kinds.append("onnx")
    if _importable("llama_cpp"):
        kinds.append("llamacpp")
    if _importable("vllm"):
        kinds.append("vllm")
    kinds.append("openai")  # an upstream server over HTTP (httpx): always available
    return (*kinds, "delay", "echo")


@functools.cache
def cuda_available() -> bool:
    """onnxruntime here has the CUDA execution provider (announced as label cuda=true)."""
    if "onnx" not in _available():
        return False
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def available_engines() -> list[str]:
    """Engine kinds this worker can run (what it announces in InstanceInfo.engines)."""
    return list(_available())


def create_engine(config: model_pb2.ModelConfig) -> Engine:
    """The engine for `config` (not loaded yet)."""
    if config.engine == "echo":
        return EchoEngine(config)
    if config.engine == "delay":
        return DelayEngine(config)
    if config.engine == "onnx":
        if "onnx" not in available_engines():
            raise errors.FailedPrecondition("the onnx engine is not available here (onnxruntime is not installed)")
        from unimodel.worker.onnx_engine import OnnxEngine

        return OnnxEngine(config)
    if config.engine in ("llamacpp", "vllm", "openai"):
        if config.engine not in available_engines():
            raise errors.FailedPrecondition(f"the {config.engine} engine is not available here (its package is not installed)")
        if config.engine == "llamacpp":
            from unimodel.worker.llamacpp_engine import LlamaCppEngine

            return LlamaCppEngine(config)
        if config.engine == "vllm":
            from unimodel.worker.vllm_engine import VllmEngine

            return VllmEngine(config)
        from unimodel.worker.upstream_engine import UpstreamEngine

        return UpstreamEngine(config)
    raise errors.InvalidArgument(f"unknown engine {config.engine!r}; known: {', '.join(available_engines())}")
