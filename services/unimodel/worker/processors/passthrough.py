"""Processing kind "none": the values are the tensors themselves, by input name."""

from __future__ import annotations

import numpy as np
from google.protobuf import struct_pb2

from unimodel.core import errors
from unimodel.core.tensors import numpy_dtype
from unimodel.core.value_arrays import array_value, numeric_array
from unimodel.core.values import from_value
from unimodel.v1 import model_pb2
from unimodel.worker.processors.processor import Processor
from unimodel.worker.tensor_batches import Prepared


class PassThrough(Processor):
    """kind "none": values are the tensors themselves, by input name."""

    kind = "none"

    def prepare_one(self, value: struct_pb2.Value) -> Prepared:
        layout = self.layout
        kind = value.WhichOneof("kind")
        if kind == "struct_value":
            fields = value.struct_value.fields
            unknown = [k for k in fields if k not in layout.inputs]
            if unknown:
                raise self.bad(f"no input {unknown[0]!r} (inputs: {', '.join(layout.inputs)})")
            missing = [k for k in layout.inputs if k not in fields]
            if missing:
                raise self.bad(f"missing input {missing[0]!r}")
            given = {name: fields[name] for name in layout.inputs}
        elif len(layout.inputs) == 1 and kind in ("list_value", "number_value", "bool_value", "string_value"):
            given = {next(iter(layout.inputs)): value}
        else:
            raise self.bad(f"input must be an object {{input name: nested list}} (inputs: {', '.join(layout.inputs)})")
        arrays: dict[str, np.ndarray] = {}
        single: bool | None = None
        rows = 1
        for name, v in given.items():
            spec = layout.inputs[name]
            arr = self._array(spec, v)
            want = len(spec.dims)
            if layout.batches:
                if arr.ndim == want:
                    is_single, arr = True, arr[None]
                elif arr.ndim == want + 1:
                    is_single = False
                else:
                    raise self.bad(f"input {name!r} has {arr.ndim} dimensions, expected {want} (one row) or {want + 1}")
                if single is not None and is_single != single:
                    raise self.bad("inputs disagree: some are one row, some a list of rows")
                single = is_single
                if arr.shape[0] < 1:
                    raise self.bad(f"input {name!r} has no rows")
                if name == next(iter(given)):
                    rows = arr.shape[0]
                elif arr.shape[0] != rows:
                    raise self.bad(f"input {name!r} has {arr.shape[0]} rows, the first input {rows}")
                shape = arr.shape[1:]
            else:
                shape = arr.shape
            if len(shape) != want or any(d != -1 and d != s for d, s in zip(spec.dims, shape, strict=True)):
                dims = ", ".join(str(d) for d in spec.dims)
                raise self.bad(f"input {name!r} has shape {list(shape)}, expected [{dims}]")
            arrays[name] = arr
        return Prepared(arrays, rows, self.outputs, context=bool(single) or not layout.batches)

    def _array(self, spec: model_pb2.TensorSpec, value: struct_pb2.Value) -> np.ndarray:
        what = f"input {spec.name!r}"
        if spec.datatype == "BYTES":
            obj = from_value(value)
            try:
                arr = np.array(obj, dtype=np.object_)
            except ValueError:
                raise self.bad(f"{what}: not a rectangular list") from None
            if any(not isinstance(x, str) for x in arr.reshape(-1)):
                raise self.bad(f"{what}: expected strings")
            return arr
        try:
            return numeric_array(value, numpy_dtype(spec.datatype), what)
        except errors.InvalidArgument as exc:
            raise self.bad(exc.message) from None

    def finish(self, item: Prepared, outputs: dict[str, np.ndarray]) -> struct_pb2.Value:
        single = item.context and self.layout.batches
        out = struct_pb2.Value()
        fields = out.struct_value.fields
        for name, arr in outputs.items():
            fields[name].CopyFrom(array_value(arr[0] if single else arr))
        return out
