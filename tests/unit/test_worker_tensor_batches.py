"""Batch assembly: checks, concatenation, zero padding, sub-batches by shape, splitting."""

from __future__ import annotations

import numpy as np
import pytest

from unimodel.core import errors, modelconfig
from unimodel.core.tensors import from_numpy
from unimodel.v1 import inference_pb2, model_pb2
from unimodel.worker import tensor_batches
from unimodel.worker.tensor_batches import Layout, Prepared


def config(**data: object) -> model_pb2.ModelConfig:
    base: dict[str, object] = {
        "name": "m",
        "inputs": [{"name": "A", "datatype": "FP32", "dims": [-1]}, {"name": "B", "datatype": "INT64", "dims": [-1]}],
        "outputs": [{"name": "Y", "datatype": "FP32", "dims": [2]}, {"name": "Z", "datatype": "FP32", "dims": [1]}],
        "max_batch_size": 4,
    }
    return modelconfig.parse({**base, **data})


def item(*tensors: tuple[str, np.ndarray], outputs: tuple[str, ...] = ()) -> inference_pb2.BatchItem:
    return inference_pb2.BatchItem(inputs=[from_numpy(n, a) for n, a in tensors], outputs=list(outputs))


def ab(rows: int, width: int, start: float = 0) -> tuple[tuple[str, np.ndarray], tuple[str, np.ndarray]]:
    a = (np.arange(rows * width, dtype=np.float32) + start).reshape(rows, width)
    return ("A", a), ("B", a.astype(np.int64))


def test_prepare_views_inputs_in_config_order() -> None:
    layout = Layout.of(config())
    (a, b) = ab(2, 3)
    p = tensor_batches.prepare_tensor_item(layout, item(b, a))
    assert list(p.inputs) == ["A", "B"] and p.rows == 2
    np.testing.assert_array_equal(p.inputs["A"], a[1])
    assert p.outputs == ("Y", "Z")


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ((("A", np.zeros((1, 2), np.float32)),), "missing input 'B'"),
        ((("A", np.zeros((1, 2), np.float32)), ("B", np.zeros((1, 2), np.int64)), ("C", np.zeros((1, 2), np.float32))), "no input 'C'"),
        ((("A", np.zeros((1, 2), np.float64)), ("B", np.zeros((1, 2), np.int64))), "input 'A' of model 'm': datatype FP64, expected FP32"),
        ((("A", np.zeros((2,), np.float32)), ("B", np.zeros((1, 2), np.int64))), r"input 'A' of model 'm': shape \[2\], expected \[-1, -1\]"),
        ((("A", np.zeros((5, 2), np.float32)), ("B", np.zeros((5, 2), np.int64))), r"batch size 5 is outside 1..4"),
        ((("A", np.zeros((1, 2), np.float32)), ("B", np.zeros((2, 2), np.int64))), "disagree on the batch size"),
        ((("A", np.zeros((1, 2), np.float32)), ("A", np.zeros((1, 2), np.float32))), "given twice"),
    ],
)
def test_prepare_names_the_tensor_and_the_expectation(tensors: tuple, message: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=message):
        tensor_batches.prepare_tensor_item(Layout.of(config()), item(*tensors))


def test_unknown_requested_output() -> None:
    layout = Layout.of(config())
    with pytest.raises(errors.InvalidArgument, match=r"model 'm' has no output 'Q' \(outputs: Y, Z\)"):
        tensor_batches.prepare_tensor_item(layout, item(*ab(1, 2), outputs=("Q",)))
    p = tensor_batches.prepare_tensor_item(layout, item(*ab(1, 2), outputs=("Z", "Z")))
    assert p.outputs == ("Z",)


def test_same_shapes_make_one_group_and_concatenate() -> None:
    layout = Layout.of(config())
    ps = [tensor_batches.prepare_tensor_item(layout, item(*ab(r, 3, start=10 * k))) for k, r in enumerate((1, 2, 1))]
    assert tensor_batches.groups(layout, ps) == [[0, 1, 2]]
    joined = tensor_batches.concat(layout, ps)
    assert joined["A"].shape == (4, 3) and joined["B"].dtype == np.int64
    np.testing.assert_array_equal(joined["A"][1:3], ab(2, 3, start=10)[0][1])


def test_different_shapes_run_as_sub_batches_without_padding() -> None:
    layout = Layout.of(config())
    ps = [tensor_batches.prepare_tensor_item(layout, item(*ab(1, w))) for w in (3, 5, 3, 5, 2)]
    assert tensor_batches.groups(layout, ps) == [[0, 2], [1, 3], [4]]


def test_zero_padding_to_the_batch_max_when_configured() -> None:
    layout = Layout.of(config(options={"pad": "zeros"}))
    assert layout.pad
    ps = [tensor_batches.prepare_tensor_item(layout, item(*ab(r, w, start=1))) for r, w in ((1, 2), (2, 4), (1, 3))]
    assert tensor_batches.groups(layout, ps) == [[0, 1, 2]]
    joined = tensor_batches.concat(layout, ps)
    expected = np.array(
        [[1, 2, 0, 0], [1, 2, 3, 4], [5, 6, 7, 8], [1, 2, 3, 0]], dtype=np.float32
    )
    np.testing.assert_array_equal(joined["A"], expected)
    np.testing.assert_array_equal(joined["B"], expected.astype(np.int64))


def test_padding_is_not_used_when_an_output_has_variable_dims() -> None:
    layout = Layout.of(config(options={"pad": "zeros"}, outputs=[{"name": "Y", "datatype": "FP32", "dims": [-1]}]))
    assert not layout.pad


def test_split_returns_each_items_rows_of_its_outputs() -> None:
    layout = Layout.of(config())
    ps = [
        tensor_batches.prepare_tensor_item(layout, item(*ab(1, 2))),
        tensor_batches.prepare_tensor_item(layout, item(*ab(2, 2), outputs=("Z",))),
        tensor_batches.prepare_tensor_item(layout, item(*ab(1, 2), outputs=("Y",))),
    ]
    assert tensor_batches.union_outputs(layout, ps) == ("Y", "Z")
    assert tensor_batches.union_outputs(layout, ps[1:2]) == ("Z",)
    out = {"Y": np.arange(8, dtype=np.float32).reshape(4, 2), "Z": np.arange(4, dtype=np.float32).reshape(4, 1)}
    parts = tensor_batches.split(layout, out, ps)
    assert [sorted(p) for p in parts] == [["Y", "Z"], ["Z"], ["Y"]]
    np.testing.assert_array_equal(parts[1]["Z"], [[1], [2]])
    np.testing.assert_array_equal(parts[2]["Y"], [[6, 7]])
    tensors = tensor_batches.to_tensors(layout, parts[1])
    assert tensors[0].name == "Z" and list(tensors[0].shape) == [2, 1] and tensors[0].datatype == "FP32"


def test_rows_are_checked_and_chunked() -> None:
    layout = Layout.of(config())
    with pytest.raises(errors.Internal, match="output 'Y' has shape"):
        tensor_batches.check_rows(layout, {"Y": np.zeros((3, 2))}, 4)
    assert tensor_batches.row_chunks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert tensor_batches.row_chunks(4, 4) == [(0, 4)]


def test_a_model_without_batching_runs_each_item_alone() -> None:
    layout = Layout.of(config(max_batch_size=0, inputs=[{"name": "A", "datatype": "FP32", "dims": [2]}]))
    assert layout.direct is None and layout.rows_limit == 1
    ps = [tensor_batches.prepare_tensor_item(layout, item(("A", np.zeros(2, np.float32)))) for _ in range(3)]
    assert tensor_batches.groups(layout, ps) == [[0], [1], [2]]
    assert ps[0].inputs["A"].shape == (2,)


def two_inputs(a_dims: list[int] | None = None) -> model_pb2.ModelConfig:
    return config(
        inputs=[{"name": "A", "datatype": "FP32", "dims": a_dims or [3]}, {"name": "B", "datatype": "INT64", "dims": [2, 2]}]
    )


def test_direct_assembly_joins_bytes_and_sends_bad_items_to_the_general_check() -> None:
    layout = Layout.of(two_inputs())
    assert layout.direct is not None
    a1, a2 = np.arange(3, dtype=np.float32)[None], np.arange(6, dtype=np.float32).reshape(2, 3) + 10
    b1, b2 = np.ones((1, 2, 2), np.int64), np.full((2, 2, 2), 7, np.int64)
    items = [
        item(("A", a1), ("B", b1)),
        item(("B", b2), ("A", a2), outputs=("Z",)),  # any order
        item(("A", a1)),  # missing B
        item(("A", a1.astype(np.float64)), ("B", b1)),  # wrong datatype
        item(("A", a1), ("B", b1), outputs=("nope",)),
        item(("A", np.zeros((1, 4), np.float32)), ("B", b1)),  # wrong shape
        item(("A", a2), ("B", b1)),  # rows disagree
    ]
    prepared, bad, groups = tensor_batches.assemble_direct(layout, items, range(len(items)))
    assert [p.index for p in prepared] == [0, 1] and [p.rows for p in prepared] == [1, 2]
    assert prepared[1].outputs == ("Z",)
    ((positions, joined),) = groups
    assert positions == [0, 1]
    np.testing.assert_array_equal(joined["A"], np.concatenate([a1, a2]))
    np.testing.assert_array_equal(joined["B"], np.concatenate([b1, b2]))
    messages = {i: e.message for i, e in bad}
    assert sorted(messages) == [2, 3, 4, 5, 6]
    assert "missing input 'B'" in messages[2]
    assert "datatype FP64, expected FP32" in messages[3]
    assert "no output 'nope'" in messages[4]
    assert "shape [1, 4], expected [-1, 3]" in messages[5]
    assert "disagree on the batch size" in messages[6]


def test_direct_assembly_groups_variable_shapes() -> None:
    layout = Layout.of(two_inputs([-1]))
    assert layout.direct is not None and not layout.pad
    b = np.zeros((1, 2, 2), np.int64)
    items = [item(("A", np.full((1, w), w, np.float32)), ("B", b)) for w in (2, 3, 2)]
    prepared, bad, groups = tensor_batches.assemble_direct(layout, items, range(3))
    assert not bad and [g[0] for g in groups] == [[0, 2], [1]]
    assert groups[0][1]["A"].tolist() == [[2, 2], [2, 2]] and groups[0][1]["B"].shape == (2, 2, 2)
    assert groups[1][1]["A"].shape == (1, 3)


def test_direct_assembly_of_one_input() -> None:
    layout = Layout.of(config(inputs=[{"name": "A", "datatype": "FP32", "dims": [2]}]))
    items = [item(("A", np.full((r, 2), r, np.float32))) for r in (1, 3)]
    items.append(item(("A", np.zeros((9, 2), np.float32))))  # more rows than max_batch_size
    prepared, bad, groups = tensor_batches.assemble_direct(layout, items, [1, 0, 2])
    assert [p.index for p in prepared] == [1, 0] and [i for i, _ in bad] == [2]
    np.testing.assert_array_equal(groups[0][1]["A"][:, 0], [3, 3, 3, 1])
    variable = Layout.of(config(inputs=[{"name": "A", "datatype": "FP32", "dims": [-1, 2]}]))
    items = [item(("A", np.zeros((1, w, 2), np.float32))) for w in (1, 4, 1)]
    items.append(item(("A", np.zeros((1, 2, 3), np.float32))))
    prepared, bad, groups = tensor_batches.assemble_direct(variable, items, range(4))
    assert [g[0] for g in groups] == [[0, 2], [1]] and groups[1][1]["A"].shape == (1, 4, 2)
    assert [i for i, _ in bad] == [3] and "expected [-1, -1, 2]" in bad[0][1].message


def test_padding_and_bytes_inputs_take_the_array_path() -> None:
    assert Layout.of(config(options={"pad": "zeros"})).direct is None
    assert Layout.of(config(inputs=[{"name": "A", "datatype": "BYTES", "dims": [1]}])).direct is None
    assert Layout.of(config(options={"pad": "zeros"}, inputs=[{"name": "A", "datatype": "FP32", "dims": [2]}])).direct is not None


def test_prepared_defaults() -> None:
    p = Prepared({}, 1, ("Y",))
    assert p.index == -1 and p.context is None


def test_output_tensors_take_the_configs_datatypes() -> None:
    layout = Layout.of(config(outputs=[
        {"name": "Y", "datatype": "FP16", "dims": [2]},
        {"name": "S", "datatype": "BYTES", "dims": [1]},
    ]))
    reply = inference_pb2.InferResponse()
    tensor_batches.add_tensors(layout, reply.outputs, {
        "Y": np.array([[1.5, 2]], dtype=np.float32)[:, ::-1],  # not contiguous, wrong dtype
        "S": np.array([["ab"]], dtype=object),
    })
    y, s = reply.outputs
    assert (y.name, y.datatype, list(y.shape)) == ("Y", "FP16", [1, 2])
    np.testing.assert_array_equal(np.frombuffer(y.contents, "<f2"), [2, 1.5])
    assert (s.datatype, s.contents) == ("BYTES", b"\x02\x00\x00\x00ab")
