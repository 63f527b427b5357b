"""Processing kind "tabular": rows of numbers -> label and class scores per row."""

from __future__ import annotations

from typing import Any

import numpy as np
from google.protobuf import struct_pb2

from unimodel.core import errors
from unimodel.core.tensors import numpy_dtype
from unimodel.core.value_arrays import numeric_array
from unimodel.core.values import to_value
from unimodel.v1 import model_pb2
from unimodel.worker.processors.processor import Processor
from unimodel.worker.tensor_batches import Layout, Prepared


class Tabular(Processor):
    """One row of numbers [f1..fn] or a list of rows -> {"label", "index", "scores": {label: p}} per
    row. Outputs: the first integer or BYTES output is the label (options.label_output), the first
    float output the scores (options.scores_output); labels.txt names the classes."""

    kind = "tabular"

    def __init__(self, config: model_pb2.ModelConfig, layout: Layout) -> None:
        super().__init__(config, layout)
        if len(layout.inputs) != 1:
            raise self.setup_error("the model must have exactly one input")
        self.input, spec = next(iter(layout.inputs.items()))
        if len(spec.dims) != 1 or spec.dims[0] < 1 or not layout.batches:
            raise self.setup_error(f"input {self.input!r} must have dims [n] with n fixed, and the model must batch")
        self.features = int(spec.dims[0])
        self.dtype = numpy_dtype(spec.datatype)

        def pick(key: str, kinds: str) -> str:
            name = self.options.get(key, "")
            if name:
                if name not in layout.outputs:
                    raise self.setup_error(f"options.{key} {name!r} is not an output of the model")
                return name
            for o in layout.outputs.values():
                if (o.datatype == "BYTES" and "S" in kinds) or (o.datatype != "BYTES" and numpy_dtype(o.datatype).kind in kinds):
                    return o.name
            return ""

        self.label_output = pick("label_output", "iuS")
        self.scores_output = pick("scores_output", "f")
        if not self.scores_output and not self.label_output:
            raise self.setup_error("the model has neither a label nor a scores output")
        self.outputs = tuple(n for n in (self.label_output, self.scores_output) if n)
        self.label_names = self.labels()

    def prepare_one(self, value: struct_pb2.Value) -> Prepared:
        if value.WhichOneof("kind") != "list_value" or not value.list_value.values:
            raise self.bad(f"input must be a row of {self.features} numbers or a list of rows")
        first = value.list_value.values[0].WhichOneof("kind")
        single = first != "list_value"
        if single:
            n = len(value.list_value.values)
            if n != self.features:
                raise self.bad(f"the row has {n} values, expected {self.features}")
        else:
            for i, row in enumerate(value.list_value.values):
                if row.WhichOneof("kind") != "list_value" or len(row.list_value.values) != self.features:
                    n = len(row.list_value.values) if row.WhichOneof("kind") == "list_value" else 1
                    raise self.bad(f"row {i} has {n} values, expected {self.features}")
        try:
            arr = numeric_array(value, self.dtype, "input")
        except errors.InvalidArgument:
            raise self.bad("rows must hold numbers only") from None
        if arr.ndim != (1 if single else 2):
            raise self.bad("rows must hold numbers only")
        if single:
            arr = arr[None]
        return Prepared({self.input: arr}, arr.shape[0], self.outputs, context=single)

    def finish(self, item: Prepared, outputs: dict[str, np.ndarray]) -> struct_pb2.Value:
        names = self.label_names
        scores = outputs.get(self.scores_output) if self.scores_output else None
        labels = outputs.get(self.label_output) if self.label_output else None
        rows = []
        for r in range(item.rows):
            row_scores = None if scores is None else np.asarray(scores[r], dtype=np.float64).reshape(-1)
            if labels is not None and labels.dtype.kind in "iu":
                index = int(labels[r])
                name = names[index] if 0 <= index < len(names) else str(index)
            elif labels is not None:
                raw = labels[r]
                name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
                index = names.index(name) if name in names else (int(np.argmax(row_scores)) if row_scores is not None else -1)
            else:
                assert row_scores is not None
                index = int(np.argmax(row_scores))
                name = names[index] if index < len(names) else str(index)
            row: dict[str, Any] = {"label": name, "index": index}
            if row_scores is not None:
                row["scores"] = {
                    (names[j] if j < len(names) else str(j)): float(p) for j, p in enumerate(row_scores)
                }
            rows.append(row)
        return to_value(rows[0] if item.context else rows)
