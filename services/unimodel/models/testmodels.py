"""Test models built with the onnx.helper API (identity, mlp) and the config-only delay model."""

from __future__ import annotations

import itertools
from pathlib import Path

from unimodel.models.common import IR_VERSION, MODEL_FILE, OPSET, make_config, tensor
from unimodel.v1 import model_pb2

MLP_LAYERS = (384, 1024, 1024, 10)
MLP_SEED = 20240503
DELAY_MS = "50"


def config_identity() -> model_pb2.ModelConfig:
    return make_config(
        "identity",
        inputs=[tensor("INPUT0", "FP32", [-1])],
        outputs=[tensor("OUTPUT0", "FP32", [-1])],
    )


def build_identity(folder: Path) -> None:
    """OUTPUT0 = INPUT0, FP32 [batch, n]."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"], name="identity")],
        "identity",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", "n"])],
    )
    _save(graph, folder, onnx)


def config_mlp() -> model_pb2.ModelConfig:
    return make_config(
        "mlp",
        inputs=[tensor("INPUT0", "FP32", [MLP_LAYERS[0]])],
        outputs=[tensor("OUTPUT0", "FP32", [MLP_LAYERS[-1]])],
    )


def build_mlp(folder: Path) -> None:
    """384 -> 1024 -> 1024 -> 10, ReLU between layers, FP32, seeded He-initialised weights."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(MLP_SEED)
    nodes, inits = [], []
    x = "INPUT0"
    last = len(MLP_LAYERS) - 2
    for i, (n_in, n_out) in enumerate(itertools.pairwise(MLP_LAYERS)):
        w = (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(np.float32)
        b = (rng.standard_normal(n_out) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        y = "OUTPUT0" if i == last else f"h{i}"
        pre = f"z{i}" if i < last else y
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [pre], name=f"dense{i}"))
        if i < last:
            nodes.append(helper.make_node("Relu", [pre], [y], name=f"relu{i}"))
        x = y
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", MLP_LAYERS[0]])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", MLP_LAYERS[-1]])],
        initializer=inits,
    )
    _save(graph, folder, onnx)


def config_delay() -> model_pb2.ModelConfig:
    """The delay engine echoes INPUT0 after delay_ms per batch (an asyncio sleep, no CPU)."""
    return make_config(
        "delay",
        engine="delay",
        inputs=[tensor("INPUT0", "FP32", [-1])],
        outputs=[tensor("OUTPUT0", "FP32", [-1])],
        options={"delay_ms": DELAY_MS},
        max_queue_delay_ms=5.0,
    )


def build_delay(folder: Path) -> None:
    """Config only: no model file."""


def _save(graph, folder: Path, onnx) -> None:
    from onnx import helper

    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION, producer_name="unimodel"
    )
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(folder / MODEL_FILE))
