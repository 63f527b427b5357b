"""Model configuration: `config.yaml` in a model folder <-> the ModelConfig message (one schema).

A model repository is a folder of model folders, Triton style:

    <repository>/<model>/config.yaml     ModelConfig fields (proto field names), `path` left out
    <repository>/<model>/model.onnx      the model file (`file`), when the engine needs one
    <repository>/<model>/...             processing assets (tokenizer.json, labels.txt)

The same message is what the gateway stores in etcd when a model is registered, so every service
reads one validated shape. Plain logic: no transport, no engine.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format

from unimodel.core import errors, subjects
from unimodel.v1 import model_pb2

CONFIG_FILE = "config.yaml"
DATATYPES = frozenset(
    {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"}
)
GENERATIVE_ENGINES = frozenset({"llamacpp", "vllm", "openai"})
"""Text-generation engines: no tensors; GenerateRequests in, token streams out (LlmConfig)."""
ENGINES = frozenset({"onnx", "delay", "echo"}) | GENERATIVE_ENGINES
TEXT_EMBEDDING = "text-embedding"
PROCESSING_KINDS = frozenset({"none", TEXT_EMBEDDING, "image-classification", "tabular"})
EXECUTION_PROVIDERS = frozenset({"auto", "cuda", "cpu"})


def parse(data: dict[str, object], *, source: str = "config") -> model_pb2.ModelConfig:
    """A ModelConfig from a plain dict (YAML / JSON body), defaults applied and validated."""
    if not isinstance(data, dict):
        raise errors.InvalidArgument(f"{source}: expected a mapping of ModelConfig fields")
    config = model_pb2.ModelConfig()
    try:
        json_format.ParseDict(data, config, ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        raise errors.InvalidArgument(f"{source}: {exc}") from None
    apply_defaults(config)
    validate(config, source=source)
    return config


def load(folder: Path) -> model_pb2.ModelConfig:
    """The config of the model folder `folder` with its absolute `path` set."""
    file = folder / CONFIG_FILE
    try:
        data = yaml.safe_load(file.read_text())
    except FileNotFoundError:
        raise errors.NotFound(f"no {CONFIG_FILE} in {folder}") from None
    except (OSError, yaml.YAMLError) as exc:
        raise errors.InvalidArgument(f"{file}: cannot read: {exc}") from None
    data = dict(data or {})
    data.setdefault("name", folder.name)
    config = parse(data, source=str(file))
    config.path = str(folder.resolve())
    return config


def to_dict(config: model_pb2.ModelConfig) -> dict[str, object]:
    """Plain dict with int64 fields as numbers (protobuf's JSON mapping quotes them) and map fields in
    key order, so config.yaml files and JSON bodies are stable."""
    data: dict[str, Any] = json_format.MessageToDict(config, preserving_proto_field_name=True)
    for kind in ("inputs", "outputs"):
        for spec in data.get(kind, []):
            if "dims" in spec:
                spec["dims"] = [int(d) for d in spec["dims"]]
    batching = data.get("batching")
    if isinstance(batching, dict) and "default_timeout_ms" in batching:
        batching["default_timeout_ms"] = int(batching["default_timeout_ms"])
    for holder in (data, data.get("processing")):
        if isinstance(holder, dict) and isinstance(holder.get("options"), dict):
            holder["options"] = dict(sorted(holder["options"].items()))
    return data


def write(folder: Path, config: model_pb2.ModelConfig) -> None:
    """Write `config.yaml` atomically (temp file + rename); `path` is not stored."""
    data = to_dict(config)
    data.pop("path", None)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".yaml", dir=folder)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    os.replace(tmp, folder / CONFIG_FILE)


def apply_defaults(config: model_pb2.ModelConfig) -> None:
    if not config.engine:
        config.engine = "onnx"
    if not config.file and config.engine == "onnx":
        config.file = "model.onnx"
    if not config.file and config.engine == "llamacpp":
        config.file = "model.gguf"
    if not config.version:
        config.version = "1"
    if config.instance_count <= 0:
        config.instance_count = 1
    if not config.execution_provider:
        config.execution_provider = "auto"
    if not config.processing.kind:
        config.processing.kind = "none"


def validate(config: model_pb2.ModelConfig, *, source: str = "config") -> None:
    def bad(field: str, why: str) -> errors.InvalidArgument:
        return errors.InvalidArgument(f"{source}: {field}: {why}", field=field)

    if not config.name or not subjects.is_valid_model_name(config.name):
        raise bad("name", f"invalid model name {config.name!r} (letters, digits and . _ : / -, at most 128)")
    if config.engine not in ENGINES:
        raise bad("engine", f"unknown engine {config.engine!r}; known: {', '.join(sorted(ENGINES))}")
    if config.execution_provider not in EXECUTION_PROVIDERS:
        raise bad("execution_provider", f"must be one of {', '.join(sorted(EXECUTION_PROVIDERS))}")
    if config.processing.kind not in PROCESSING_KINDS:
        raise bad("processing.kind", f"unknown kind {config.processing.kind!r}; known: {', '.join(sorted(PROCESSING_KINDS))}")
    if config.max_batch_size < 0:
        raise bad("max_batch_size", "must be >= 0")
    if config.replicas < 0:
        raise bad("replicas", "must be >= 0")
    generative = is_generative(config)
    if config.cache and not generative:
        raise bad("cache", "only text-generation models (llamacpp, vllm, openai) have a chat cache")
    if generative:
        llm = config.llm
        for name in ("context_length", "max_prompt_tokens", "max_tokens", "default_max_tokens", "max_sequences"):
            if getattr(llm, name) < 0:
                raise bad(f"llm.{name}", "must be >= 0")
        if llm.context_length and llm.max_prompt_tokens > llm.context_length:
            raise bad("llm.max_prompt_tokens", f"is over llm.context_length ({llm.context_length})")
        if config.engine == "openai" and not llm.upstream_url.startswith(("http://", "https://")):
            raise bad("llm.upstream_url", "the openai engine needs the upstream's base URL (http://host:port/v1)")
    for kind, specs in (("inputs", config.inputs), ("outputs", config.outputs)):
        if not specs and not generative:
            raise bad(kind, "at least one tensor is required")
        seen: set[str] = set()
        for i, spec in enumerate(specs):
            where = f"{kind}[{i}]"
            if not spec.name:
                raise bad(f"{where}.name", "required")
            if spec.name in seen:
                raise bad(f"{where}.name", f"duplicate tensor name {spec.name!r}")
            seen.add(spec.name)
            if spec.datatype not in DATATYPES:
                raise bad(f"{where}.datatype", f"unknown datatype {spec.datatype!r}; known: {', '.join(sorted(DATATYPES))}")
            if any(d == 0 or d < -1 for d in spec.dims):
                raise bad(f"{where}.dims", "each dimension is a positive size or -1 (any)")
    b = config.batching
    if b.max_queue_delay_ms < 0:
        raise bad("batching.max_queue_delay_ms", "must be >= 0")
    if b.max_queue_size < 0:
        raise bad("batching.max_queue_size", "must be >= 0")
    if b.default_timeout_ms < 0:
        raise bad("batching.default_timeout_ms", "must be >= 0")
    for size in b.preferred_batch_sizes:
        if size < 1 or (config.max_batch_size and size > config.max_batch_size):
            raise bad("batching.preferred_batch_sizes", f"{size} is not within 1..max_batch_size ({config.max_batch_size})")
    if b.priority_levels < 0:
        raise bad("batching.priority_levels", "must be >= 0")
    if b.default_priority_level < 0 or b.default_priority_level > max(1, b.priority_levels):
        raise bad("batching.default_priority_level", f"must be within 1..priority_levels ({max(1, b.priority_levels)})")


def is_generative(config: model_pb2.ModelConfig) -> bool:
    """A text-generation model (chat / completions) rather than a tensor model."""
    return config.engine in GENERATIVE_ENGINES


def levels(config: model_pb2.ModelConfig) -> int:
    """Number of priority levels (at least 1)."""
    return max(1, config.batching.priority_levels)


def batch_rows_limit(config: model_pb2.ModelConfig) -> int:
    """Rows a batch may hold: max_batch_size, or 1 for a model that does not batch."""
    return config.max_batch_size if config.max_batch_size > 0 else 1
