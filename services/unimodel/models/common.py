"""Shared pieces of the model builders: config construction, quiet exports, ONNX checks.

Only the standard library and unimodel.core at import time: the heavy packages (torch,
onnx, transformers, scikit-learn) are imported inside the builder functions, never at serve time.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from unimodel.core import errors, modelconfig
from unimodel.v1 import model_pb2

MODEL_FILE = "model.onnx"
OPSET = 17
# IR version 8 pairs with opset 17 and loads on every onnxruntime this project supports.
IR_VERSION = 8


class MissingPackage(errors.FailedPrecondition):
    """A package a builder needs is not installed."""


def tensor(name: str, datatype: str, dims: Sequence[int]) -> dict[str, object]:
    return {"name": name, "datatype": datatype, "dims": [int(d) for d in dims]}


def make_config(
    name: str,
    *,
    inputs: Sequence[dict[str, object]],
    outputs: Sequence[dict[str, object]],
    engine: str = "onnx",
    processing: str = "none",
    processing_options: Mapping[str, str] | None = None,
    options: Mapping[str, str] | None = None,
    max_batch_size: int = 64,
    max_queue_delay_ms: float = 1.0,
    preferred_batch_sizes: Sequence[int] = (),
    instance_count: int = 1,
) -> model_pb2.ModelConfig:
    """A validated ModelConfig in the shape every demo model shares (contract: batch 64, delay 1 ms)."""
    data: dict[str, object] = {
        "name": name,
        "engine": engine,
        "version": "1",
        "inputs": list(inputs),
        "outputs": list(outputs),
        "max_batch_size": max_batch_size,
        "batching": {"max_queue_delay_ms": max_queue_delay_ms, "preferred_batch_sizes": list(preferred_batch_sizes)},
        "instance_count": instance_count,
        "execution_provider": "auto",
        "processing": {"kind": processing, "options": dict(processing_options or {})},
        "options": dict(options or {}),
    }
    if engine == "onnx":
        data["file"] = MODEL_FILE
    return modelconfig.parse(data, source=f"model {name!r}")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters' deprecation and tracer warnings (they are about the exporter, not the model)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def onnx_ops(path: Path) -> dict[str, int]:
    """Operator histogram of an ONNX graph (top-level graph; the demo models have no subgraphs)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops


def check_onnx(folder: Path, config: model_pb2.ModelConfig) -> None:
    """The model file loads in onnxruntime and its tensors match the config (names, datatypes, ranks, sizes).

    Catches an export that drifted from the contract before the model folder is published.
    """
    import onnxruntime as ort

    from unimodel.core.tensors import ONNX_TYPES

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(folder / config.file), options, providers=["CPUExecutionProvider"])
    batched = config.max_batch_size > 0
    for kind, specs, args in (
        ("input", config.inputs, session.get_inputs()),
        ("output", config.outputs, session.get_outputs()),
    ):
        found = {a.name: a for a in args}
        if set(found) != {s.name for s in specs}:
            raise errors.Internal(
                f"{config.name}: the ONNX {kind}s are {sorted(found)}, the config names {sorted(s.name for s in specs)}"
            )
        for spec in specs:
            arg = found[spec.name]
            datatype = ONNX_TYPES.get(arg.type, arg.type)
            if datatype != spec.datatype:
                raise errors.Internal(
                    f"{config.name}: {kind} {spec.name} is {datatype} in ONNX, {spec.datatype} in config"
                )
            shape = list(arg.shape)
            if batched:
                shape = shape[1:]
            if len(shape) != len(spec.dims):
                raise errors.Internal(
                    f"{config.name}: {kind} {spec.name} has shape {arg.shape} in ONNX, dims {list(spec.dims)}"
                )
            for got, want in zip(shape, spec.dims, strict=True):  # lengths checked above
                if want != -1 and isinstance(got, int) and got != want:
                    raise errors.Internal(
                        f"{config.name}: {kind} {spec.name} has shape {arg.shape} in ONNX, dims {list(spec.dims)}"
                    )
                if want == -1 and isinstance(got, int):
                    raise errors.Internal(
                        f"{config.name}: {kind} {spec.name} has a fixed size where the config says -1"
                    )
