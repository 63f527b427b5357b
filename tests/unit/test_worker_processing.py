"""Pre/post-processing kinds on tiny real models (onnx.helper), a real tokenizer and real images."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import struct_pb2
from PIL import Image
from test_worker_onnx import VOCAB, identity_model, image_model, iris_like_model, mlp_model, mlp_reference, text_model

from unimodel.core import errors, modelconfig
from unimodel.core.context import now_ms
from unimodel.core.value_arrays import array_value, numbers, numeric_array
from unimodel.core.values import from_value, to_value
from unimodel.v1 import inference_pb2, model_pb2
from unimodel.worker.models import LoadedModel, ModelTable
from unimodel.worker.processors import make_processor
from unimodel.worker.runner import run_batch
from unimodel.worker.tensor_batches import Layout


# ---------------------------------------------------------------------------------------------------
# fast Value <-> array paths
@pytest.mark.parametrize(
    "data",
    [[0.0, -1.5, 3, 1e300, -0.0], [[1, 2, 3], [0, 0, 0]], 7.0, [], [[]], [5]],
)
def test_array_value_matches_the_plain_encoding(data: object) -> None:
    arr = np.array(data, dtype=np.float64)
    assert array_value(arr) == to_value(arr.tolist())
    assert from_value(array_value(arr)) == from_value(to_value(data))


def test_array_value_of_other_arrays() -> None:
    assert from_value(array_value(np.array([True, False]))) == [True, False]
    assert from_value(array_value(np.zeros((2, 1, 2), np.int32))) == [[[0, 0]], [[0, 0]]]
    assert from_value(array_value(np.array([b"ab", "c"], dtype=object))) == ["ab", "c"]
    assert from_value(array_value(np.float32(0.5))) == 0.5


def test_numbers_reads_only_flat_number_lists() -> None:
    np.testing.assert_array_equal(numbers(to_value([0, 1.5, -2])), [0, 1.5, -2])
    for other in ([1, "a"], [1, None], [True], [[1]], "x", [], [1, [2]], ["abcdefg"]):
        assert numbers(to_value(other)) is None, other
    np.testing.assert_array_equal(numeric_array(to_value([[1, 2], [3, 4]]), np.dtype(np.float32), "x"), [[1, 2], [3, 4]])
    np.testing.assert_array_equal(numeric_array(to_value([[[1]], [[2]]]), np.dtype(np.int64), "x"), [[[1]], [[2]]])
    with pytest.raises(errors.InvalidArgument, match="not a rectangular list"):
        numeric_array(to_value([[1, 2], [3]]), np.dtype(np.float32), "x")
    with pytest.raises(errors.InvalidArgument, match="expected numbers"):
        numeric_array(to_value([[1, "2"]]), np.dtype(np.float32), "x")


# ---------------------------------------------------------------------------------------------------
async def loaded(config) -> tuple[ModelTable, LoadedModel]:
    table = ModelTable()
    return table, await table.load_now(config)


def values_batch(*values: object, model: str = "m") -> inference_pb2.BatchRequest:
    batch = inference_pb2.BatchRequest(model=model)
    for v in values:
        batch.items.add(input=v if isinstance(v, struct_pb2.Value) else to_value(v))
    return batch


def outputs_of(out: list) -> list[object]:
    return [o if isinstance(o, errors.UnimodelError) else from_value(o) for o in out]


async def test_kind_none_takes_named_or_bare_lists_with_or_without_the_batch_dimension(tmp_path: Path) -> None:
    config, weights = mlp_model(tmp_path)
    table, model = await loaded(config)
    try:
        x = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)
        out = outputs_of(await run_batch(model, values_batch(
            x[0].tolist(),
            {"INPUT0": x[1:3].tolist()},
            {"INPUT0": x[0].tolist(), "extra": [1]},
            [1, 2],
            {"INPUT0": [[1] * 6, [1] * 5]},
            "text",
            [[[1] * 6]],
        )))
        ref = mlp_reference(x, weights)
        np.testing.assert_allclose(out[0]["OUTPUT0"], ref[0], rtol=1e-5, atol=1e-5)
        assert isinstance(out[0]["SUM0"], list) and len(out[0]["SUM0"]) == 1
        np.testing.assert_allclose(out[1]["OUTPUT0"], ref[1:3], rtol=1e-5, atol=1e-5)
        assert "no input 'extra'" in out[2].message
        assert "input 'INPUT0' has shape [2], expected [6]" in out[3].message
        assert "not a rectangular list" in out[4].message
        assert "expected numbers" in out[5].message
        assert "has 3 dimensions, expected 1 (one row) or 2" in out[6].message
        assert all(isinstance(o, errors.InvalidArgument) for o in out[2:])
    finally:
        await table.close()


async def test_kind_none_on_a_variable_length_model_groups_by_shape(tmp_path: Path) -> None:
    table, model = await loaded(identity_model(tmp_path))
    try:
        out = outputs_of(await run_batch(model, values_batch([1, 2], [3], [[4, 5], [6, 7]], {"INPUT0": [8]})))
        assert out == [{"OUTPUT0": [1, 2]}, {"OUTPUT0": [3]}, {"OUTPUT0": [[4, 5], [6, 7]]}, {"OUTPUT0": [8]}]
    finally:
        await table.close()


async def test_tabular_rows_and_labels(tmp_path: Path) -> None:
    config, w = iris_like_model(tmp_path)
    table, model = await loaded(config)
    try:
        out = outputs_of(await run_batch(model, values_batch(
            [5.0, 1.0, 0.0, 0.0],
            [[0, 0, 3, 0], [0, 2, 0, 1]],
            [1, 2, 3],
            [[1, 2, 3, 4], [1, 2]],
            [1, "a", 2, 3],
            "row",
            [],
        )))
        assert out[0]["label"] == "setosa" and out[0]["index"] == 0
        logits = np.array([5.0, 1.0, 0.0, 0.0], np.float32) @ w
        p = np.exp(logits - logits.max())
        p /= p.sum()
        assert out[0]["scores"] == pytest.approx(dict(zip(["setosa", "versicolor", "virginica"], p.tolist(), strict=True)), rel=1e-5)
        assert [r["label"] for r in out[1]] == ["virginica", "versicolor"]
        assert "the row has 3 values, expected 4" in out[2].message
        assert "row 1 has 2 values, expected 4" in out[3].message
        assert "numbers only" in out[4].message
        assert "a row of 4 numbers or a list of rows" in out[5].message
        assert isinstance(out[6], errors.InvalidArgument)
    finally:
        await table.close()


def png(color: tuple[int, int, int], size: tuple[int, int] = (20, 12), fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


async def test_image_classification(tmp_path: Path) -> None:
    table, model = await loaded(image_model(tmp_path))
    try:
        gif = io.BytesIO()
        Image.new("RGB", (4, 4)).save(gif, format="GIF")
        out = outputs_of(await run_batch(model, values_batch(
            png((250, 10, 10)),
            {"image": png((10, 10, 240), fmt="JPEG"), "top_k": 3},
            "data:image/png;base64," + png((10, 200, 10)),
            "not base64 !!",
            base64.b64encode(b"hello").decode(),
            base64.b64encode(gif.getvalue()).decode(),
            {"image": png((0, 0, 0)), "top_k": 0},
            {"img": "x"},
            42,
        )))
        assert len(out[0]["labels"]) == 2 and out[0]["labels"][0]["label"] == "red"  # options.top_k 2
        assert out[0]["labels"][0]["index"] == 0 and 0.5 < out[0]["labels"][0]["score"] <= 1.0
        assert len(out[1]["labels"]) == 3 and out[1]["labels"][0]["label"] == "blue"
        scores = [lab["score"] for lab in out[1]["labels"]]
        assert scores == sorted(scores, reverse=True)
        assert out[2]["labels"][0]["label"] == "green"
        assert "not valid base64" in out[3].message
        assert "not a JPEG or PNG image" in out[4].message
        assert "not a JPEG or PNG image" in out[5].message
        assert "top_k must be a positive integer" in out[6].message
        assert '"image"' in out[7].message
        assert "base64 JPEG/PNG string" in out[8].message
    finally:
        await table.close()


def test_image_preprocessing_resizes_crops_and_normalises(tmp_path: Path) -> None:
    config = image_model(tmp_path)
    config.processing.options.update({"mean": "0.5", "std": "0.25", "resize": "10", "size": "8"})
    processor = make_processor(config)
    img = Image.new("RGB", (30, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 5, 20))  # a blue stripe on the left, cropped away
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    x = processor.decode(base64.b64encode(buf.getvalue()).decode())
    assert x.shape == (3, 8, 8) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], (1 - 0.5) / 0.25, atol=1e-5)
    np.testing.assert_allclose(x[2], (0 - 0.5) / 0.25, atol=1e-5)


def test_image_processing_config_errors(tmp_path: Path) -> None:
    config = image_model(tmp_path)
    config.processing.options["size"] = "16"
    with pytest.raises(errors.FailedPrecondition, match="options.size 16 does not match"):
        make_processor(config)
    config = image_model(tmp_path, name="other")
    for key, value, message in (
        ("labels", "nope.txt", "nope.txt does not exist"),
        ("layout", "HWC", "options.layout HWC does not match"),
        ("interpolation", "cubic", "options.interpolation must be one of"),
        ("scale", "1/0", "is not a number or a fraction"),
        ("color", "CMYK", "options.color must be RGB or BGR"),
        ("mean", "1,2", "options.mean needs 1 or 3 numbers"),
        ("std", "0", "options.std must not hold 0"),
    ):
        bad = model_pb2.ModelConfig()
        bad.CopyFrom(config)
        bad.processing.options[key] = value
        with pytest.raises(errors.FailedPrecondition, match=message):
            make_processor(bad)


def test_image_options_bgr_scale_and_layout(tmp_path: Path) -> None:
    config = image_model(tmp_path)
    config.processing.options.update({"color": "BGR", "scale": "1", "layout": "CHW", "interpolation": "nearest"})
    processor = make_processor(config)
    x = processor.decode(png((255, 0, 10)))
    np.testing.assert_allclose([x[0, 0, 0], x[1, 0, 0], x[2, 0, 0]], [10, 0, 255])


def expected_embedding(table: np.ndarray, words: list[str]) -> np.ndarray:
    ids = [VOCAB.index(w) if w in VOCAB else 1 for w in words]
    v = table[ids].mean(axis=0)
    return v / np.linalg.norm(v)


async def test_text_embedding_pools_over_real_tokens_only(tmp_path: Path) -> None:
    config, table_w = text_model(tmp_path)
    table, model = await loaded(config)
    try:
        batch = values_batch(
            "hello world",
            ["the quick brown fox jumps over the lazy dog", "fox", "zebra fox"],
            42,
            [],
            ["ok", 1],
        )
        batch.items.add(input=to_value("hello"), deadline_unix_ms=now_ms() - 1)
        out = await run_batch(model, batch)
        plain = outputs_of(out)
        np.testing.assert_allclose(plain[0]["embedding"], expected_embedding(table_w, ["hello", "world"]), rtol=1e-5)
        embs = plain[1]["embeddings"]
        assert len(embs) == 3
        # truncated to max_length 6 tokens
        np.testing.assert_allclose(embs[0], expected_embedding(table_w, "the quick brown fox jumps over".split()), rtol=1e-5)
        np.testing.assert_allclose(embs[1], expected_embedding(table_w, ["fox"]), rtol=1e-5)
        np.testing.assert_allclose(embs[2], expected_embedding(table_w, ["[UNK]", "fox"]), rtol=1e-5)
        assert "a string or a list of strings" in plain[2].message
        assert "empty list" in plain[3].message
        assert "a string or a list of strings" in plain[4].message
        assert isinstance(out[5], errors.DeadlineExceeded)
        # alone, the same text gives the same vector as in a padded batch
        alone = outputs_of(await run_batch(model, values_batch("fox")))
        np.testing.assert_allclose(alone[0]["embedding"], embs[1], rtol=1e-6)
    finally:
        await table.close()


async def test_text_embedding_of_a_pooled_model_is_normalised(tmp_path: Path) -> None:
    config, table_w = text_model(tmp_path, pooled=True)
    table, model = await loaded(config)
    try:
        (out,) = outputs_of(await run_batch(model, values_batch("hello hello world")))
        v = table_w[[2, 2, 3]].sum(axis=0)
        np.testing.assert_allclose(out["embedding"], v / np.linalg.norm(v), rtol=1e-5)
    finally:
        await table.close()


def test_text_embedding_config_errors(tmp_path: Path) -> None:
    config, _ = text_model(tmp_path)
    (Path(config.path) / "tokenizer.json").unlink()
    with pytest.raises(errors.FailedPrecondition, match="tokenizer.json does not exist"):
        make_processor(config)
    config, _ = text_model(tmp_path, name="t2")
    config.inputs.add(name="pixel_values", datatype="FP32", dims=[3])
    with pytest.raises(errors.FailedPrecondition, match="cannot fill input 'pixel_values'"):
        make_processor(config)


def test_unknown_processing_kind(tmp_path: Path) -> None:
    config = identity_model(tmp_path)
    config.processing.kind = "audio"
    with pytest.raises(errors.FailedPrecondition, match="unknown processing kind 'audio'"):
        make_processor(config, Layout.of(config))


def test_tabular_needs_a_fixed_feature_row(tmp_path: Path) -> None:
    config = modelconfig.parse({
        "name": "t",
        "inputs": [{"name": "x", "datatype": "FP32", "dims": [-1]}],
        "outputs": [{"name": "y", "datatype": "FP32", "dims": [2]}],
        "max_batch_size": 4,
        "processing": {"kind": "tabular"},
    })
    config.path = str(tmp_path)
    with pytest.raises(errors.FailedPrecondition, match="dims \\[n\\] with n fixed"):
        make_processor(config)
