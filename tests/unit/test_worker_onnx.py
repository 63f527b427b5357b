"""ONNX engine on tiny models built with onnx.helper in tmp_path; the builders are shared by the other
worker tests (`from test_worker_onnx import ...`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers.loop_ticks import ticks_during
from unimodel.core import errors, modelconfig
from unimodel.v1 import model_pb2
from unimodel.worker.engines import available_engines, create_engine
from unimodel.worker.engines.onnx import CPU, CUDA, OnnxEngine, providers_for


def save_model(folder: Path, nodes: list, inputs: list, outputs: list, weights: dict[str, np.ndarray] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    graph = helper.make_graph(
        nodes, folder.name, inputs, outputs, [numpy_helper.from_array(w, n) for n, w in (weights or {}).items()]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")


def write_config(folder: Path, data: dict) -> model_pb2.ModelConfig:
    config = modelconfig.parse({"name": folder.name, **data})
    modelconfig.write(folder, config)
    return modelconfig.load(folder)


def identity_model(root: Path, name: str = "identity", **extra: object) -> model_pb2.ModelConfig:
    """INPUT0 FP32 [-1] -> OUTPUT0 (a copy), batching."""
    folder = root / name
    save_model(
        folder,
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["N", "L"])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["N", "L"])],
    )
    return write_config(folder, {
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}],
        "max_batch_size": 8,
        **extra,
    })


def mlp_model(
    root: Path, name: str = "mlp", features: int = 6, hidden: int = 5, classes: int = 3, **extra: object
) -> tuple[model_pb2.ModelConfig, list[np.ndarray]]:
    """INPUT0 FP32 [features] -> relu(x W1) W2 = OUTPUT0 FP32 [classes], plus SUM0 = row sums of x."""
    rng = np.random.default_rng(7)
    w1 = rng.standard_normal((features, hidden)).astype(np.float32)
    w2 = rng.standard_normal((hidden, classes)).astype(np.float32)
    axes = np.array([1], dtype=np.int64)
    folder = root / name
    save_model(
        folder,
        [
            helper.make_node("MatMul", ["INPUT0", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["OUTPUT0"]),
            helper.make_node("ReduceSum", ["INPUT0", "axes"], ["SUM0"], keepdims=1),
        ],
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["N", features])],
        [
            helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["N", classes]),
            helper.make_tensor_value_info("SUM0", TensorProto.FLOAT, ["N", 1]),
        ],
        {"w1": w1, "w2": w2, "axes": axes},
    )
    config = write_config(folder, {
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [features]}],
        "outputs": [
            {"name": "OUTPUT0", "datatype": "FP32", "dims": [classes]},
            {"name": "SUM0", "datatype": "FP32", "dims": [1]},
        ],
        "max_batch_size": 16,
        **extra,
    })
    return config, [w1, w2]


def mlp_reference(x: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    return np.maximum(x @ weights[0], 0) @ weights[1]


def iris_like_model(root: Path, name: str = "iris") -> tuple[model_pb2.ModelConfig, np.ndarray]:
    """features FP32 [4] -> probabilities = softmax(x W) [3], label = argmax INT64 [] (skl2onnx shape)."""
    w = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0.5]], dtype=np.float32)
    folder = root / name
    save_model(
        folder,
        [
            helper.make_node("MatMul", ["features", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
            helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
        ],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3]),
        ],
        {"w": w},
    )
    (folder / "labels.txt").write_text("setosa\nversicolor\nvirginica\n")
    config = write_config(folder, {
        "inputs": [{"name": "features", "datatype": "FP32", "dims": [4]}],
        "outputs": [
            {"name": "label", "datatype": "INT64", "dims": []},
            {"name": "probabilities", "datatype": "FP32", "dims": [3]},
        ],
        "max_batch_size": 256,
        "processing": {"kind": "tabular"},
    })
    return config, w


def image_model(root: Path, name: str = "imagenet", size: int = 8, classes: int = 4) -> model_pb2.ModelConfig:
    """image FP32 [3, size, size] -> probabilities = softmax(mean over pixels per channel @ W) [classes]
    (class 0 = red, 1 = green, 2 = blue, 3 = dark)."""
    w = np.array([[4, -2, -2, -3], [-2, 4, -2, -3], [-2, -2, 4, -3]], dtype=np.float32)
    folder = root / name
    save_model(
        folder,
        [
            helper.make_node("ReduceMean", ["image"], ["m"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["m", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes])],
        {"w": w},
    )
    (folder / "labels.txt").write_text("red\ngreen\nblue\ndark\n")
    return write_config(folder, {
        "inputs": [{"name": "image", "datatype": "FP32", "dims": [3, size, size]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "dims": [classes]}],
        "max_batch_size": 8,
        "processing": {
            "kind": "image-classification",
            "options": {"mean": "0,0,0", "std": "1,1,1", "top_k": "2", "resize": str(size)},
        },
    })


VOCAB = ["[PAD]", "[UNK]", "hello", "world", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"]


def write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def text_model(root: Path, name: str = "minilm", dim: int = 4, pooled: bool = False, **options: str) -> tuple[model_pb2.ModelConfig, np.ndarray]:
    """input_ids, attention_mask INT64 [-1] -> a vector per token from a table [N, L, dim] (or, pooled,
    the plain sum over the sequence [N, dim])."""
    table = np.random.default_rng(3).standard_normal((len(VOCAB), dim)).astype(np.float32)
    folder = root / name
    out_name = "last_hidden_state"
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["tokens" if pooled else out_name])]
    out_shape: list[object] = ["N", "L", dim]
    dims: list[int] = [-1, dim]
    if pooled:
        nodes.append(helper.make_node("ReduceSum", ["tokens", "axes"], ["embedding"], keepdims=0))
        out_name, out_shape, dims = "embedding", ["N", dim], [dim]
    weights = {"table": table, "axes": np.array([1], dtype=np.int64)} if pooled else {"table": table}
    nodes.append(helper.make_node("Cast", ["attention_mask"], ["mask_unused"], to=TensorProto.FLOAT))
    save_model(
        folder,
        nodes,
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "L"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "L"]),
        ],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)],
        weights,
    )
    write_tokenizer(folder / "tokenizer.json")
    config = write_config(folder, {
        "inputs": [
            {"name": "input_ids", "datatype": "INT64", "dims": [-1]},
            {"name": "attention_mask", "datatype": "INT64", "dims": [-1]},
        ],
        "outputs": [{"name": out_name, "datatype": "FP32", "dims": dims}],
        "max_batch_size": 8,
        "processing": {"kind": "text-embedding", "options": {"max_length": "6", **options}},
        "options": {"pad": "zeros"},
    })
    return config, table


# --------------------------------------------------------------------------------------------------
def test_providers() -> None:
    assert providers_for("cpu", [CUDA, CPU]) == [CPU]
    assert providers_for("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert providers_for("auto", [CPU]) == [CPU]
    assert providers_for("cuda", [CUDA, CPU]) == [CUDA, CPU]
    with pytest.raises(errors.FailedPrecondition, match="CUDAExecutionProvider"):
        providers_for("cuda", [CPU])


def test_onnx_is_announced() -> None:
    engines = available_engines()
    assert engines[0] == "onnx" and engines[-2:] == ["delay", "echo"]
    assert "openai" in engines  # an upstream server over HTTP needs no extra package


async def test_onnx_engine_runs_off_the_event_loop_with_one_session_per_instance(tmp_path: Path) -> None:
    config, weights = mlp_model(tmp_path, instance_count=2)
    engine = create_engine(config)
    assert isinstance(engine, OnnxEngine)
    await engine.load()
    try:
        assert engine._sessions is not None and engine._sessions.qsize() == 2
        x = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
        outs, ticks = await ticks_during(asyncio.gather(*(engine.infer({"INPUT0": x}, ["OUTPUT0", "SUM0"]) for _ in range(8))))
        for out in outs:
            np.testing.assert_allclose(out["OUTPUT0"], mlp_reference(x, weights), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(out["SUM0"][:, 0], x.sum(axis=1), rtol=1e-5)
        assert ticks > 0  # the loop kept running while sessions ran
        only_sum = await engine.infer({"INPUT0": x}, ["SUM0"])
        assert list(only_sum) == ["SUM0"]
        assert engine._sessions.qsize() == 2
    finally:
        await engine.unload()
    with pytest.raises(errors.Unavailable):
        await engine.infer({"INPUT0": x}, ["SUM0"])


async def test_onnx_engine_errors_are_clear(tmp_path: Path) -> None:
    config, _ = mlp_model(tmp_path)
    engine = create_engine(config)
    await engine.load()
    try:
        with pytest.raises(errors.InvalidArgument, match="onnxruntime"):
            await engine.infer({"INPUT0": np.zeros((2, 5), np.float32)}, ["OUTPUT0"])
    finally:
        await engine.unload()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"inputs": [{"name": "X", "datatype": "FP32", "dims": [6]}]}, "config input 'X' is not in the model"),
        ({"inputs": [{"name": "INPUT0", "datatype": "FP64", "dims": [6]}]}, "is FP32 in the model, FP64 in the config"),
        ({"inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [2, 3]}]}, "has rank 2 in the model"),
        ({"outputs": [{"name": "NOPE", "datatype": "FP32", "dims": [3]}]}, "config output 'NOPE'"),
        ({"file": "missing.onnx"}, "does not exist"),
    ],
)
async def test_load_checks_the_model_against_its_config(tmp_path: Path, change: dict, message: str) -> None:
    config, _ = mlp_model(tmp_path)
    data = {**modelconfig.to_dict(config), **change}
    bad = modelconfig.parse(data)
    bad.path = config.path
    engine = create_engine(bad)
    with pytest.raises(errors.FailedPrecondition, match=message):
        await engine.load()


async def test_a_file_that_is_not_onnx_fails_to_load(tmp_path: Path) -> None:
    config, _ = mlp_model(tmp_path)
    (Path(config.path) / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(errors.FailedPrecondition, match="cannot load"):
        await create_engine(config).load()


async def test_row_by_row_gives_each_text_the_vector_it_gets_alone(model_repository: Path) -> None:
    """all-MiniLM-L6-v2 with int8 weights quantizes its activations per run: in one padded run a text's
    vector would depend on its batch-mates. row_by_row runs each row alone at its own length."""
    from tokenizers import Tokenizer

    folder = model_repository / "all-minilm-l6-v2"
    config = modelconfig.load(folder)
    assert config.options["row_by_row"] == "1"
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))  # pads to the longest text of a call

    def feeds(texts: list[str]) -> dict[str, np.ndarray]:
        enc = tokenizer.encode_batch(texts)
        return {
            "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        }

    texts = ["How do I reset my password?", "Hi", "The cat sat on the mat while the dog slept by the fire all afternoon."]
    engine = create_engine(config)
    await engine.load()
    try:
        batch = (await engine.infer(feeds(texts), ["embedding"]))["embedding"]
        alone = [(await engine.infer(feeds([t]), ["embedding"]))["embedding"][0] for t in texts]
        assert batch.shape == (3, 384)
        np.testing.assert_array_equal(batch, np.stack(alone))
    finally:
        await engine.unload()
    one_run_config = model_pb2.ModelConfig()
    one_run_config.CopyFrom(config)
    del one_run_config.options["row_by_row"]  # the whole padded batch in one run
    padded = OnnxEngine(one_run_config)
    await padded.load()
    try:
        one_run = (await padded.infer(feeds(texts), ["embedding"]))["embedding"]
        assert not np.array_equal(one_run[1], alone[1])  # what row_by_row is for
    finally:
        await padded.unload()


def test_rows_of_different_shapes_are_stacked_with_zero_padding() -> None:
    from unimodel.worker.engines.onnx import _stack

    out = _stack([np.ones((1, 2), np.float32), np.full((1, 3), 2.0, np.float32)])
    np.testing.assert_array_equal(out, [[1, 1, 0], [2, 2, 2]])
    np.testing.assert_array_equal(_stack([np.ones((2, 4)), np.zeros((1, 4))]), np.concatenate([np.ones((2, 4)), np.zeros((1, 4))]))
