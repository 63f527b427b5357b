"""KServe v2 documents built from a ModelConfig, in Triton's flavour: server and model metadata, the model
configuration (JSON and model_config_pb2), statistics (from statistics.ModelSnapshot), versions.
Plain logic, no transport."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2

from unimodel.core import errors
from unimodel.gateway.statistics import BatchSnapshot, Duration, ModelSnapshot
from unimodel.v1 import model_pb2

SERVER_NAME = "unimodel"
# Protocol extensions this gateway really implements (GET /v2 and gRPC ServerMetadata). perf_analyzer
# reads server-side statistics only when "statistics" is listed.
EXTENSIONS = ("binary_tensor_data", "model_configuration", "schedule_policy", "statistics")
DEFAULT_VERSION = "1"
# Triton's model-configuration data types
_TRITON_TYPES = {
    "BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64", "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64", "FP16": "TYPE_FP16", "FP32": "TYPE_FP32", "FP64": "TYPE_FP64", "BYTES": "TYPE_STRING",
}


def model_version(config: model_pb2.ModelConfig | None) -> str:
    """The version clients see: the config's version when it is a number (perf_analyzer parses it as an
    integer), else "1"."""
    if config is not None and config.version.isdigit():
        return config.version
    return DEFAULT_VERSION


def check_version(config: model_pb2.ModelConfig | None, model: str, version: str) -> None:
    """NotFound unless `version` is empty or the one version the model serves."""
    if not version:
        return
    served = model_version(config)
    if version != served and not (config is not None and version == config.version):
        raise errors.NotFound(f"model {model!r} has no version {version!r}; it serves version {served}", model=model)


def platform(config: model_pb2.ModelConfig | None) -> str:
    if config is None:
        return "unimodel"
    return "onnxruntime_onnx" if config.engine == "onnx" else f"unimodel_{config.engine}"


def backend(config: model_pb2.ModelConfig) -> str:
    return "onnxruntime" if config.engine == "onnx" else config.engine


def tensor_shape(spec: model_pb2.TensorSpec, max_batch_size: int) -> list[int]:
    """The KServe shape: the batch dimension (-1) first when the model batches."""
    return ([-1] if max_batch_size > 0 else []) + [int(d) for d in spec.dims]


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(name: str, config: model_pb2.ModelConfig | None) -> dict[str, Any]:
    """GET /v2/models/{name}. A model hosted by a worker without a registered config (a built-in one)
    has no tensors to describe."""
    doc: dict[str, Any] = {"name": name, "versions": [model_version(config)], "platform": platform(config)}
    if config is None:
        doc["inputs"], doc["outputs"] = [], []
        return doc
    mbs = config.max_batch_size
    doc["inputs"] = [{"name": s.name, "datatype": s.datatype, "shape": tensor_shape(s, mbs)} for s in config.inputs]
    doc["outputs"] = [{"name": s.name, "datatype": s.datatype, "shape": tensor_shape(s, mbs)} for s in config.outputs]
    return doc


def model_metadata_proto(name: str, config: model_pb2.ModelConfig | None) -> service_pb2.ModelMetadataResponse:
    return json_format.ParseDict(model_metadata(name, config), service_pb2.ModelMetadataResponse())


_KINDS = {"cuda": "KIND_GPU", "cpu": "KIND_CPU", "auto": "KIND_AUTO"}


def model_config(config: model_pb2.ModelConfig) -> dict[str, Any]:
    """Triton's model configuration (model_config.proto) as JSON, as GET /v2/models/{m}/config answers."""
    doc: dict[str, Any] = {
        "name": config.name,
        "platform": platform(config),
        "backend": backend(config),
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": config.max_batch_size,
        "input": [
            {"name": s.name, "data_type": _TRITON_TYPES[s.datatype], "format": "FORMAT_NONE", "dims": [int(d) for d in s.dims],
             "is_shape_tensor": False, "allow_ragged_batch": False, "optional": False}
            for s in config.inputs
        ],
        "output": [
            {"name": s.name, "data_type": _TRITON_TYPES[s.datatype], "dims": [int(d) for d in s.dims],
             "label_filename": "", "is_shape_tensor": False}
            for s in config.outputs
        ],
        "instance_group": [
            {"name": f"{config.name}_0", "kind": _KINDS.get(config.execution_provider, "KIND_AUTO"),
             "count": max(1, config.instance_count)}
        ],
        "default_model_filename": config.file,
        "model_transaction_policy": {"decoupled": False},
        "parameters": {k: {"string_value": v} for k, v in sorted(config.options.items())},
    }
    if config.processing.kind and config.processing.kind != "none":
        doc["parameters"]["processing"] = {"string_value": config.processing.kind}
    if config.max_batch_size > 0:
        b = config.batching
        levels = b.priority_levels if b.priority_levels > 1 else 0
        doc["dynamic_batching"] = {
            "preferred_batch_size": list(b.preferred_batch_sizes),
            "max_queue_delay_microseconds": round(b.max_queue_delay_ms * 1000),
            "preserve_ordering": False,
            "priority_levels": levels,
            "default_priority_level": (b.default_priority_level or levels) if levels else 0,
            "default_queue_policy": {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": b.default_timeout_ms * 1000,
                "allow_timeout_override": True,
                "max_queue_size": b.max_queue_size,
            },
        }
    return doc


def model_config_proto(config: model_pb2.ModelConfig) -> model_config_pb2.ModelConfig:
    return json_format.ParseDict(model_config(config), model_config_pb2.ModelConfig())


def _duration(d: Duration) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


def statistics_entry(name: str, version: str, snap: ModelSnapshot) -> dict[str, Any]:
    """One element of Triton's "model_stats" list; every duration is present (perf_analyzer reads them all)."""
    return {
        "name": name,
        "version": version,
        "last_inference": snap.last_inference_ms,
        "inference_count": snap.inference_count,
        "execution_count": snap.execution_count,
        "inference_stats": {
            "success": _duration(snap.success),
            "fail": _duration(snap.fail),
            "queue": _duration(snap.queue),
            "compute_input": _duration(snap.compute_input),
            "compute_infer": _duration(snap.compute_infer),
            "compute_output": _duration(snap.compute_output),
            "cache_hit": {"count": 0, "ns": 0},
            "cache_miss": {"count": 0, "ns": 0},
        },
        "response_stats": {},
        "batch_stats": [
            {
                "batch_size": b.batch_size,
                "compute_input": _duration(b.compute_input),
                "compute_infer": _duration(b.compute_infer),
                "compute_output": _duration(b.compute_output),
            }
            for b in snap.batches
        ],
        "memory_usage": [],
    }


def _duration_of(d: service_pb2.StatisticDuration) -> Duration:
    return Duration(d.count, d.ns)


def snapshot_of(entry: service_pb2.ModelStatistics) -> ModelSnapshot:
    """statistics_entry read back (another gateway's, kserve/cluster_stats.py)."""
    stats = entry.inference_stats
    return ModelSnapshot(
        last_inference_ms=entry.last_inference, inference_count=entry.inference_count,
        execution_count=entry.execution_count, success=_duration_of(stats.success), fail=_duration_of(stats.fail),
        queue=_duration_of(stats.queue), compute_input=_duration_of(stats.compute_input),
        compute_infer=_duration_of(stats.compute_infer), compute_output=_duration_of(stats.compute_output),
        batches=tuple(
            BatchSnapshot(b.batch_size, _duration_of(b.compute_input), _duration_of(b.compute_infer), _duration_of(b.compute_output))
            for b in entry.batch_stats
        ),
    )


def statistics_document(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"model_stats": entries}


def statistics_proto(entries: list[dict[str, Any]]) -> service_pb2.ModelStatisticsResponse:
    return json_format.ParseDict(statistics_document(entries), service_pb2.ModelStatisticsResponse())
