"""Model configuration: `config.yaml` in a model folder <-> the ModelConfig message (one schema).

A model repository is a folder of model folders, Triton style:

    <repository>/<model>/config.yaml     ModelConfig fields (proto field names), `path` left out
    <repository>/<model>/model.onnx      the model file (`file`), when the engine needs one
    <repository>/<model>/...             processing assets (tokenizer.json, labels.txt)

The same message is what the gateway stores in etcd when a model is registered, so every service
reads one validated shape. Plain logic: no transport, no engine.

Safe by construction (a registration is someone else's input; so is a config read back from etcd):
- every field that names a file (`file`, and the option keys in FILE_OPTIONS) is resolved by
  :func:`model_file` inside the model folder: absolute paths, `..` and symlinks that lead out of it are
  refused (PermissionDenied, 403). The gateway checks them at registration; the worker opens files only
  through the same function. One exception: the model file itself (`file`) may be a symlink that sits in
  the folder and points elsewhere (`model.gguf` -> an installed package's GGUF): the operator made it.
- every number has a range (RANGES, *_NUMBER_OPTIONS, the limits below), checked by :func:`validate`
  (InvalidArgument, 400, naming the field and the range); the proto documents the same ranges.
- an `openai`-engine model's upstream URL and API-key variable are checked against an operator's
  allow-list (:class:`UpstreamPolicy`) by :func:`check_upstream`, at the gateway and again at the worker.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any
from urllib.parse import unquote, urlsplit

import yaml
from google.protobuf import json_format
from pydantic import AfterValidator

from unimodel.core import errors, subjects
from unimodel.v1 import model_pb2

CONFIG_FILE = "config.yaml"
DATATYPES = frozenset(
    {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"}
)
GENERATIVE_ENGINES = frozenset({"llamacpp", "vllm", "openai"})
"""Text-generation engines: no tensors; GenerateRequests in, token streams out (LlmConfig)."""
SPEECH_ENGINES = frozenset({"whisper"})
"""Speech-to-text engines: predict values {"audio": base64, ...} in, transcripts out (gateway/openai/audio.py)."""
ENGINES = frozenset({"onnx", "delay", "echo"}) | GENERATIVE_ENGINES | SPEECH_ENGINES
TEXT_EMBEDDING = "text-embedding"
PROCESSING_KINDS = frozenset({"none", TEXT_EMBEDDING, "image-classification", "tabular"})
EXECUTION_PROVIDERS = frozenset({"auto", "cuda", "cpu"})

# --- what names a file -------------------------------------------------------------------------------
FILE_FIELDS = frozenset({"file"})
"""Top-level ModelConfig fields that name a file of the model folder."""
FILE_OPTIONS: dict[str, frozenset[str]] = {
    "processing.options": frozenset({"labels", "tokenizer"}),  # labels.txt, tokenizer.json
    "options": frozenset({"tokenizer"}),  # the vllm engine's tokenizer folder
}
"""Option keys (per option map) whose values name a file of the model folder: the one list of them."""
LINKABLE_FIELDS = frozenset({"file"})
"""Fields whose file may be a symlink in the folder that points outside it (the weights, e.g. model.gguf ->
an installed package's file). Everything else (labels, tokenizer: read back to clients) stays inside."""
MAX_PATH_CHARS = 1024

# --- ranges (inclusive; the proto comments say the same) ---------------------------------------------
MAX_TOKENS_RANGE = (0, 1_048_576)
RANGES: dict[str, tuple[float, float]] = {
    "max_batch_size": (0, 65_536),
    "instance_count": (1, 64),  # 0 (unset) means 1
    "replicas": (0, 1024),
    "batching.max_queue_delay_ms": (0, 60_000),
    "batching.max_queue_size": (0, 1_000_000),
    "batching.priority_levels": (0, 16),
    "batching.default_priority_level": (0, 16),
    "batching.default_timeout_ms": (0, 86_400_000),
    "llm.context_length": MAX_TOKENS_RANGE,
    "llm.max_prompt_tokens": MAX_TOKENS_RANGE,
    "llm.max_tokens": MAX_TOKENS_RANGE,
    "llm.default_max_tokens": MAX_TOKENS_RANGE,
    "llm.max_sequences": (0, 1024),
}
"""Numeric ModelConfig fields -> (lowest, highest) allowed."""
DIM_RANGE = (1, 2**31)
"""A tensor dimension: -1 (any size) or within this range."""
PROCESSING_NUMBER_OPTIONS: dict[str, tuple[float, float]] = {
    "max_length": (1, 1_048_576),  # text-embedding: tokens per text
    "size": (1, 8192),  # image-classification: the square the image is cropped to
    "resize": (1, 16_384),  # image-classification: the shorter side before the crop
    "top_k": (1, 100_000),  # image-classification: labels answered
}
"""processing.options that are numbers -> range (written as strings in the option map)."""
ENGINE_NUMBER_OPTIONS: dict[str, tuple[float, float]] = {
    "delay_ms": (0, 3_600_000),  # delay engine
    "intra_op_threads": (0, 1024),  # onnx
    "row_by_row": (0, 1),  # onnx
    "n_threads": (1, 1024),  # llamacpp
    "n_batch": (1, 1_048_576),  # llamacpp
    "parallel": (1, 256),  # llamacpp: sequence slots per instance (continuous batching)
    "kv_unified": (0, 1),  # llamacpp
    "stream_interval": (1, 4096),  # any generative engine: tokens per streamed message
    "top_k": (0, 1_000_000),  # llamacpp default
    "min_p": (0, 1),  # llamacpp default
    "max_audio_seconds": (0.1, 86_400),  # whisper: longer audio is 413
    "beam_size": (1, 16),  # whisper
    "intra_threads": (0, 1024),  # whisper: CTranslate2 threads (0: the CPUs this process may use)
    "pack_seconds": (0, 28),  # whisper: clips up to this long share a 30 s window (0: off)
    "pack_gap_seconds": (0.2, 10),  # whisper: silence between packed clips
    "timeout_s": (0.001, 86_400),  # openai: longest wait for the upstream's next byte
    "connect_timeout_s": (0.001, 600),  # openai
    "gpu_memory_utilization": (0.01, 1),  # vllm
    "tensor_parallel_size": (1, 64),  # vllm
    "kv_cache_memory_gib": (0, 4096),  # vllm
}
"""options (engine options) that are numbers -> range."""
LIMITS = {
    "name_chars": 256,  # tensor names, option keys
    "tensors": 1024,  # inputs, outputs (each)
    "dims": 32,  # dimensions of a tensor
    "preferred_batch_sizes": 64,
    "options": 256,  # entries of an option map
    "option_chars": 65_536,  # an option's value
    "version_chars": 128,
    "chat_template_chars": 131_072,
    "upstream_url_chars": 2048,
    "upstream_model_chars": 512,
}
"""Sizes of strings and lists (characters / entries)."""
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


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
    if not config.file and config.engine in SPEECH_ENGINES:
        config.file = "model.bin"
    if not config.version:
        config.version = "1"
    if config.instance_count <= 0:
        config.instance_count = 1
    if not config.execution_provider:
        config.execution_provider = "auto"
    if not config.processing.kind:
        config.processing.kind = "none"


def validate(config: model_pb2.ModelConfig, *, source: str = "config") -> None:
    """Field rules and ranges (InvalidArgument naming the field), and the shape of file names (no absolute
    or `..` path: PermissionDenied). Files themselves are checked against a folder by check_files."""

    def bad(field: str, why: str) -> errors.InvalidArgument:
        return errors.InvalidArgument(f"{source}: {field}: {why}", field=field)

    def within(field: str, value: float, lo: float, hi: float) -> None:
        if not (lo <= value <= hi):  # NaN too
            raise bad(field, f"must be within {_num(lo)}..{_num(hi)} (got {_num(value)})")

    def chars(field: str, value: str, limit: int) -> None:
        if len(value) > limit:
            raise bad(field, f"is {len(value)} characters long; at most {limit}")

    if not config.name or not subjects.is_valid_model_name(config.name):
        raise bad("name", f"invalid model name {config.name[:200]!r} (letters, digits and . _ : / -, at most 128)")
    if config.engine not in ENGINES:
        raise bad("engine", f"unknown engine {config.engine[:100]!r}; known: {', '.join(sorted(ENGINES))}")
    if config.execution_provider not in EXECUTION_PROVIDERS:
        raise bad("execution_provider", f"must be one of {', '.join(sorted(EXECUTION_PROVIDERS))}")
    if config.processing.kind not in PROCESSING_KINDS:
        raise bad("processing.kind", f"unknown kind {config.processing.kind[:100]!r}; known: {', '.join(sorted(PROCESSING_KINDS))}")
    chars("version", config.version, LIMITS["version_chars"])
    for field, (lo, hi) in RANGES.items():
        within(field, _get(config, field), lo, hi)
    for field in FILE_FIELDS:
        value = getattr(config, field)
        if value:
            relative_name(value, field, source=source)
    for holder, (options, numbers) in (
        ("processing.options", (config.processing.options, PROCESSING_NUMBER_OPTIONS)),
        ("options", (config.options, ENGINE_NUMBER_OPTIONS)),
    ):
        if len(options) > LIMITS["options"]:
            raise bad(holder, f"has {len(options)} entries; at most {LIMITS['options']}")
        for key, value in options.items():
            chars(f"{holder} key", key, LIMITS["name_chars"])
            chars(f"{holder}.{key}", value, LIMITS["option_chars"])
            if key in FILE_OPTIONS[holder] and value:
                relative_name(value, f"{holder}.{key}", source=source)
            if key in numbers and value:
                try:
                    number = float(value)
                except ValueError:
                    field = f"{holder}.{key}"
                    raise errors.InvalidArgument(f"{source}: {field} {value[:100]!r} is not a number", field=field) from None
                within(f"{holder}.{key}", number, *numbers[key])
    generative = is_generative(config)
    if config.cache and not generative:
        raise bad("cache", "only text-generation models (llamacpp, vllm, openai) have a chat cache")
    llm = config.llm
    chars("llm.chat_template", llm.chat_template, LIMITS["chat_template_chars"])
    chars("llm.upstream_url", llm.upstream_url, LIMITS["upstream_url_chars"])
    chars("llm.upstream_model", llm.upstream_model, LIMITS["upstream_model_chars"])
    if llm.upstream_api_key_env and not ENV_NAME.fullmatch(llm.upstream_api_key_env):
        raise bad("llm.upstream_api_key_env", "must be an environment variable name (letters, digits, _; at most 128)")
    if generative:
        if llm.context_length and llm.max_prompt_tokens > llm.context_length:
            raise bad("llm.max_prompt_tokens", f"is over llm.context_length ({llm.context_length})")
        if config.engine == "openai" and not llm.upstream_url.startswith(("http://", "https://")):
            raise bad("llm.upstream_url", "the openai engine needs the upstream's base URL (http://host:port/v1)")
    for kind, specs in (("inputs", config.inputs), ("outputs", config.outputs)):
        if not specs and not generative:
            raise bad(kind, "at least one tensor is required")
        if len(specs) > LIMITS["tensors"]:
            raise bad(kind, f"has {len(specs)} tensors; at most {LIMITS['tensors']}")
        seen: set[str] = set()
        for i, spec in enumerate(specs):
            where = f"{kind}[{i}]"
            if not spec.name:
                raise bad(f"{where}.name", "required")
            chars(f"{where}.name", spec.name, LIMITS["name_chars"])
            if spec.name in seen:
                raise bad(f"{where}.name", f"duplicate tensor name {spec.name!r}")
            seen.add(spec.name)
            if spec.datatype not in DATATYPES:
                raise bad(f"{where}.datatype", f"unknown datatype {spec.datatype[:100]!r}; known: {', '.join(sorted(DATATYPES))}")
            if len(spec.dims) > LIMITS["dims"]:
                raise bad(f"{where}.dims", f"has {len(spec.dims)} dimensions; at most {LIMITS['dims']}")
            lo, hi = DIM_RANGE
            if any(d != -1 and not (lo <= d <= hi) for d in spec.dims):
                raise bad(f"{where}.dims", f"each dimension is -1 (any size) or within {lo}..{hi}")
    b = config.batching
    if len(b.preferred_batch_sizes) > LIMITS["preferred_batch_sizes"]:
        raise bad("batching.preferred_batch_sizes", f"at most {LIMITS['preferred_batch_sizes']} sizes")
    for size in b.preferred_batch_sizes:
        if size < 1 or (config.max_batch_size and size > config.max_batch_size):
            raise bad("batching.preferred_batch_sizes", f"{size} is not within 1..max_batch_size ({config.max_batch_size})")
    if b.default_priority_level > max(1, b.priority_levels):
        raise bad("batching.default_priority_level", f"must be within 1..priority_levels ({max(1, b.priority_levels)})")


def _get(config: model_pb2.ModelConfig, field: str) -> float:
    value: Any = config
    for part in field.split("."):
        value = getattr(value, part)
    return float(value)


def _num(value: float) -> str:
    return str(int(value)) if math.isfinite(value) and value == int(value) else str(value)


# --- files of the model folder -----------------------------------------------------------------------
def relative_name(value: str, field: str, *, source: str = "config") -> PurePosixPath:
    """`value` as a relative path that stays in its folder by its words alone (no absolute path, no `..`,
    no NUL): PermissionDenied otherwise. Symlinks are model_file's part."""
    if len(value) > MAX_PATH_CHARS or "\0" in value:
        raise errors.InvalidArgument(f"{source}: {field}: not a file name (NUL, or over {MAX_PATH_CHARS} characters)", field=field)
    path = PurePosixPath(value)
    if path.is_absolute() or value.startswith("~"):
        raise errors.PermissionDenied(
            f"{source}: {field}: {value[:200]!r} is an absolute path; name a file inside the model folder", field=field
        )
    if ".." in path.parts:
        raise errors.PermissionDenied(f"{source}: {field}: {value[:200]!r} leads out of the model folder (..)", field=field)
    return path


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def model_file(config: model_pb2.ModelConfig, relative: str, field: str) -> Path:
    """The file `relative` (the value of `field`) of the model folder `config.path`, checked to be inside
    it once symlinks are resolved: PermissionDenied (403, naming the field) for an absolute path, `..`, or
    a symlink that leads out. Only a LINKABLE_FIELDS file may itself be a symlink placed in the folder
    that points elsewhere. The file need not exist (the caller says so); the path returned is the one to
    open (folder / relative)."""
    where = f"model {config.name!r}"
    name = relative_name(relative, field, source=where)
    if not config.path:
        raise errors.PermissionDenied(f"{where}: {field}: the model has no folder to find {relative!r} in", field=field)
    folder = Path(config.path)
    root = folder.resolve()
    path = folder / name
    if _inside(path.resolve(), root):
        return path
    if field in LINKABLE_FIELDS and path.is_symlink() and _inside(path.parent.resolve(), root):
        return path  # the operator's link (e.g. model.gguf -> a package's file)
    raise errors.PermissionDenied(f"{where}: {field}: {relative!r} leads out of the model folder (a symlink)", field=field)


def file_fields(config: model_pb2.ModelConfig) -> list[tuple[str, str]]:
    """(field, value) of every field of `config` that names a file, set or defaulted."""
    out = [(field, getattr(config, field)) for field in sorted(FILE_FIELDS) if getattr(config, field)]
    for holder, options in (("processing.options", config.processing.options), ("options", config.options)):
        out += [(f"{holder}.{key}", options[key]) for key in sorted(FILE_OPTIONS[holder]) if options.get(key)]
    return out


def check_files(config: model_pb2.ModelConfig) -> None:
    """Every file a config names resolves inside its model folder (model_file's rules)."""
    if not config.path:
        for field, value in file_fields(config):
            relative_name(value, field, source=f"model {config.name!r}")
        return
    for field, value in file_fields(config):
        model_file(config, value, field)


# --- upstream servers (the openai engine) ------------------------------------------------------------
@dataclass(frozen=True)
class UpstreamPolicy:
    """What an `openai`-engine model may name: `urls`, the URL prefixes its llm.upstream_url may start with,
    and `key_envs`, the environment variables its llm.upstream_api_key_env may name. Empty: none.
    `where` says whose settings these are, for messages ("the gateway", "this worker")."""

    urls: tuple[str, ...] = ()
    key_envs: tuple[str, ...] = ()
    where: str = "the gateway"


def url_prefix_error(prefix: str) -> str:
    """Why `prefix` cannot be an upstream_urls entry ("" when it can): scheme://host[:port][/path]."""
    try:
        parts = urlsplit(prefix)
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number or out of range)
    except ValueError as exc:
        return str(exc)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be http:// or https:// and a host"
    if parts.username is not None or parts.query or parts.fragment:
        return "must have no user, query or fragment"
    return ""


def checked_url_prefix(prefix: str) -> str:
    """A settings validator: `prefix` as an upstream_urls entry, or ValueError saying why it cannot be one."""
    why = url_prefix_error(prefix)
    if why:
        raise ValueError(f"{prefix!r}: {why}")
    return prefix


def checked_env_name(name: str) -> str:
    """A settings validator: `name` as an upstream_key_envs entry, or ValueError."""
    if not ENV_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not an environment variable name")
    return name


UpstreamUrlPrefix = Annotated[str, AfterValidator(checked_url_prefix)]
UpstreamKeyEnv = Annotated[str, AfterValidator(checked_env_name)]


def _path_segments(path: str) -> list[str]:
    return [s for s in path.split("/") if s]


def url_allowed(url: str, prefix: str) -> bool:
    """`url` starts with the allow-list entry `prefix`, compared as URLs: the same scheme and host, the
    same port (any port when the prefix names none), and the prefix's path as whole leading segments. A URL
    with a user part, a query, or `.`/`..` segments is never allowed."""
    if url_prefix_error(prefix):
        return False
    try:
        u, p = urlsplit(url), urlsplit(prefix)
        u_port, p_port = u.port, p.port
    except ValueError:
        return False
    if u.username is not None or u.password is not None or u.query or u.fragment:
        return False
    if u.scheme.lower() != p.scheme.lower() or not u.hostname or u.hostname != p.hostname:
        return False
    if p_port is not None and (u_port or (443 if u.scheme.lower() == "https" else 80)) != p_port:
        return False
    segments = _path_segments(u.path)
    if any(unquote(s) in (".", "..") or "/" in unquote(s) or "\\" in unquote(s) for s in segments):
        return False
    wanted = _path_segments(p.path)
    return segments[: len(wanted)] == wanted


def check_upstream(config: model_pb2.ModelConfig, policy: UpstreamPolicy) -> None:
    """An `openai`-engine model's upstream URL and key variable are allowed by `policy` (PermissionDenied
    naming the field and the setting that would allow it)."""
    if config.engine != "openai":
        return
    llm = config.llm
    url = llm.upstream_url
    if not any(url_allowed(url, prefix) for prefix in policy.urls):
        raise errors.PermissionDenied(
            f"model {config.name!r}: llm.upstream_url {url[:200]!r} is not allowed: {policy.where}'s setting "
            f"upstream_urls (--upstream-urls / UNIMODEL_UPSTREAM_URLS) lists the URL prefixes allowed"
            + ("" if policy.urls else ", and it is empty"),
            field="llm.upstream_url",
        )
    env = llm.upstream_api_key_env
    if env and env not in policy.key_envs:
        raise errors.PermissionDenied(
            f"model {config.name!r}: llm.upstream_api_key_env {env[:128]!r} is not allowed: {policy.where}'s setting "
            f"upstream_key_envs (--upstream-key-envs / UNIMODEL_UPSTREAM_KEY_ENVS) lists the variables a model may name",
            field="llm.upstream_api_key_env",
        )


def is_generative(config: model_pb2.ModelConfig) -> bool:
    """A text-generation model (chat / completions) rather than a tensor model."""
    return config.engine in GENERATIVE_ENGINES


def levels(config: model_pb2.ModelConfig) -> int:
    """Number of priority levels (at least 1)."""
    return max(1, config.batching.priority_levels)


def batch_rows_limit(config: model_pb2.ModelConfig) -> int:
    """Rows a batch may hold: max_batch_size, or 1 for a model that does not batch."""
    return config.max_batch_size if config.max_batch_size > 0 else 1
