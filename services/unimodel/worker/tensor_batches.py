"""Batch assembly: check tensor items against the model's config, concatenate them along the batch
dimension, split the outputs back per item. Plain logic: no transport, no engine.

Items whose -1 dimensions differ cannot share one array. With ``options.pad: zeros`` they are
zero-padded to the largest size in the batch (exact for models that mask padding, e.g. BERT-style
input_ids + attention_mask); otherwise each distinct shape runs as its own sub-batch. Padding is only
used when every output has fixed dimensions, so no padded output is ever returned to a caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from unimodel.core import errors
from unimodel.core.tensors import check_input, num_elements, numpy_dtype, serialize_bytes, to_numpy
from unimodel.v1 import inference_pb2, model_pb2, tensor_pb2


@dataclass(slots=True)
class Prepared:
    """One item ready for the engine: its input arrays (with the batch dimension when the model
    batches) and the outputs it wants."""

    inputs: dict[str, np.ndarray]
    rows: int
    outputs: tuple[str, ...]
    context: Any = None  # the processor's own (value items)
    index: int = -1  # position of the item in its BatchRequest


@dataclass(slots=True, frozen=True)
class _Direct:
    name: str
    datatype: str
    dims: tuple[int, ...]  # without the batch dimension; -1 = any
    fixed: bool  # no -1 in dims
    dtype: np.dtype


@dataclass(slots=True)
class Layout:
    """What batching needs to know of a model, computed once per loaded config."""

    model: str
    inputs: dict[str, model_pb2.TensorSpec]
    outputs: dict[str, model_pb2.TensorSpec]
    max_batch_size: int
    pad: bool = False
    output_names: tuple[str, ...] = field(default=())
    # Inputs of fixed-size datatypes (no BYTES) in a batching model, unless padding is needed: items
    # are checked straight from their wire fields and joined from their bytes (`assemble_direct`),
    # with no array per item.
    direct: tuple[_Direct, ...] | None = None
    output_dtypes: dict[str, np.dtype] = field(default_factory=dict)

    @classmethod
    def of(cls, config: model_pb2.ModelConfig) -> Layout:
        outputs = {o.name: o for o in config.outputs}
        fixed_outputs = all(d > 0 for o in config.outputs for d in o.dims)
        pad = config.options.get("pad", "") == "zeros" and fixed_outputs and config.max_batch_size > 0
        variable = any(d < 0 for i in config.inputs for d in i.dims)
        direct = None
        if config.max_batch_size > 0 and all(i.datatype != "BYTES" for i in config.inputs) and not (pad and variable):
            direct = tuple(
                _Direct(i.name, i.datatype, tuple(int(d) for d in i.dims), all(d > 0 for d in i.dims),
                        numpy_dtype(i.datatype))
                for i in config.inputs
            )
        return cls(
            model=config.name,
            inputs={i.name: i for i in config.inputs},
            outputs=outputs,
            max_batch_size=config.max_batch_size,
            pad=pad,
            output_names=tuple(outputs),
            direct=direct,
            output_dtypes={o.name: numpy_dtype(o.datatype) for o in config.outputs},
        )

    @property
    def batches(self) -> bool:
        return self.max_batch_size > 0

    @property
    def rows_limit(self) -> int:
        return self.max_batch_size if self.max_batch_size > 0 else 1


def requested_outputs(layout: Layout, names: Sequence[str]) -> tuple[str, ...]:
    """The outputs an item asked for (all when it names none); unknown names are InvalidArgument."""
    if not names:
        return layout.output_names
    for name in names:
        if name not in layout.outputs:
            raise errors.InvalidArgument(
                f"model {layout.model!r} has no output {name!r} (outputs: {', '.join(layout.output_names)})",
                model=layout.model, field=name,
            )
    return tuple(dict.fromkeys(names))


def prepare_tensor_item(layout: Layout, item: inference_pb2.BatchItem) -> Prepared:
    """Check a KServe item's tensors against the config and view them as arrays (no copy)."""
    arrays: dict[str, np.ndarray] = {}
    rows = -1
    for tensor in item.inputs:
        spec = layout.inputs.get(tensor.name)
        if spec is None:
            raise errors.InvalidArgument(
                f"model {layout.model!r} has no input {tensor.name!r} (inputs: {', '.join(layout.inputs)})",
                model=layout.model, field=tensor.name,
            )
        if tensor.name in arrays:
            raise errors.InvalidArgument(f"input {tensor.name!r} is given twice", model=layout.model, field=tensor.name)
        n = check_input(spec, tensor, layout.max_batch_size, layout.model)
        if rows < 0:
            rows = n
        elif n != rows:
            raise errors.InvalidArgument(
                f"inputs of model {layout.model!r} disagree on the batch size: {tensor.name!r} has {n} rows, "
                f"{next(iter(arrays))!r} has {rows}",
                model=layout.model, field=tensor.name,
            )
        arrays[tensor.name] = to_numpy(tensor)
    if len(arrays) != len(layout.inputs):
        missing = [name for name in layout.inputs if name not in arrays]
        raise errors.InvalidArgument(
            f"model {layout.model!r}: missing input{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}",
            model=layout.model, field=missing[0],
        )
    if len(arrays) > 1:  # engines and concatenation see inputs in config order
        arrays = {name: arrays[name] for name in layout.inputs}
    return Prepared(arrays, rows, requested_outputs(layout, item.outputs))


Group = tuple[list[int], dict[str, np.ndarray]]
"""Positions of prepared items that run together, and their inputs already concatenated."""

ShapeKey = tuple[tuple[int, ...], ...]
"""Items join one group when their direct inputs have the same shapes: each input's dims after the batch
dimension, in layout order; () for an input whose dims are fixed."""

_FIXED: ShapeKey = ((),)


def assemble_direct(
    layout: Layout, items: Sequence[inference_pb2.BatchItem], which: Sequence[int]
) -> tuple[list[Prepared], list[tuple[int, errors.UnimodelError]], list[Group]]:
    """The fast path for tensor items: check each item's tensors against the config straight from the
    wire fields and join their bytes into one array per input and shape group (one copy, no array per
    item). Returns the good items, (position in the batch, error) of the bad ones, and the groups."""
    assert layout.direct is not None
    direct = layout.direct
    single = direct[0] if len(direct) == 1 else None
    prepared: list[Prepared] = []
    bad: list[tuple[int, errors.UnimodelError]] = []
    by_key: dict[ShapeKey, tuple[list[int], list[list[bytes]]]] = {}
    for i in which:
        item = items[i]
        tensors = item.inputs
        checked = _direct_check(tensors, direct, single, layout.max_batch_size)
        if checked is None:
            try:  # the general check names the exact problem
                p = prepare_tensor_item(layout, item)
            except errors.UnimodelError as exc:
                bad.append((i, exc))
                continue
            rows = p.rows
            key = tuple(() if d.fixed else p.inputs[d.name].shape[1:] for d in direct)
            contents = [p.inputs[d.name].tobytes() for d in direct]
        else:
            rows, key, contents = checked
        try:
            outputs = requested_outputs(layout, item.outputs) if item.outputs else layout.output_names
        except errors.UnimodelError as exc:
            bad.append((i, exc))
            continue
        group = by_key.get(key)
        if group is None:
            group = by_key[key] = ([], [[] for _ in direct])
        group[0].append(len(prepared))
        for k, c in enumerate(contents):
            group[1][k].append(c)
        prepared.append(Prepared({}, rows, outputs, index=i))
    groups: list[Group] = []
    for key, (positions, parts) in by_key.items():
        joined = {
            d.name: np.frombuffer(b"".join(parts[k]), dtype=d.dtype).reshape(-1, *(d.dims if d.fixed else key[k]))
            for k, d in enumerate(direct)
        }
        groups.append((positions, joined))
    return prepared, bad, groups


def _direct_check(
    tensors: Sequence[tensor_pb2.Tensor], direct: tuple[_Direct, ...], single: _Direct | None, limit: int
) -> tuple[int, ShapeKey, list[bytes]] | None:
    """(rows, shape key, contents in layout order) of an item whose tensors match the layout; None
    when anything is off. Each `contents` is read once (the protobuf getter copies it)."""
    if len(tensors) != len(direct):
        return None
    if single is not None:
        t = tensors[0]
        if t.name != single.name or t.datatype != single.datatype:
            return None
        shape = tuple(t.shape)
        inner = shape[1:]
        contents = t.contents
        rows = _shape_rows(single, shape, inner, len(contents), limit)
        return None if rows < 0 else (rows, _FIXED if single.fixed else (inner,), [contents])
    rows = -1
    seen: dict[str, tuple[tuple[int, ...], bytes]] = {}
    for t in tensors:
        spec = next((d for d in direct if d.name == t.name), None)
        if spec is None or t.name in seen or t.datatype != spec.datatype:
            return None
        shape = tuple(t.shape)
        contents = t.contents
        n = _shape_rows(spec, shape, shape[1:], len(contents), limit)
        if n < 0 or (rows >= 0 and n != rows):
            return None
        rows = n
        seen[t.name] = (shape[1:], contents)
    key = tuple(() if d.fixed else seen[d.name][0] for d in direct)
    return rows, key, [seen[d.name][1] for d in direct]


def _shape_rows(spec: _Direct, shape: tuple[int, ...], inner: tuple[int, ...], size: int, limit: int) -> int:
    if len(inner) != len(spec.dims) or not shape:
        return -1
    if spec.fixed:
        if inner != spec.dims:
            return -1
    elif any(d != -1 and d != s or s < 0 for d, s in zip(spec.dims, inner, strict=True)):  # lengths checked above
        return -1
    n = shape[0]
    if n < 1 or n > limit or size != num_elements(shape) * spec.dtype.itemsize:
        return -1
    return n


def groups(layout: Layout, items: Sequence[Prepared]) -> list[list[int]]:
    """Positions of `items` that run together: all of them when shapes agree (or are padded), else one
    group per distinct non-batch shape; one per item for a model that does not batch."""
    if not items:
        return []
    if not layout.batches:
        return [[i] for i in range(len(items))]
    if layout.pad or len(items) == 1:
        return [list(range(len(items)))]
    by_shape: dict[tuple[tuple[int, ...], ...], list[int]] = {}
    for i, p in enumerate(items):
        key = tuple(a.shape[1:] for a in p.inputs.values())
        by_shape.setdefault(key, []).append(i)
    return list(by_shape.values())


def concat(layout: Layout, items: Sequence[Prepared]) -> dict[str, np.ndarray]:
    """One array per input holding every item's rows in order; zero-padded to the largest shape when
    shapes differ (only ever called with differing shapes when `layout.pad`)."""
    if len(items) == 1:
        return items[0].inputs
    out: dict[str, np.ndarray] = {}
    for name in layout.inputs:
        parts = [p.inputs[name] for p in items]
        first = parts[0].shape[1:]
        if all(a.shape[1:] == first for a in parts):
            out[name] = np.concatenate(parts)
            continue
        if not layout.pad:
            raise errors.Internal(f"input {name!r}: items of different shapes in one sub-batch")
        inner = tuple(max(dims) for dims in zip(*(a.shape[1:] for a in parts), strict=True))
        total = sum(a.shape[0] for a in parts)
        buf = np.zeros((total, *inner), dtype=parts[0].dtype)
        row = 0
        for a in parts:
            buf[(slice(row, row + a.shape[0]), *(slice(0, d) for d in a.shape[1:]))] = a
            row += a.shape[0]
        out[name] = buf
    return out


def union_outputs(layout: Layout, items: Sequence[Prepared]) -> tuple[str, ...]:
    """Outputs any item of the group needs, in config order."""
    wanted: set[str] = set()
    for p in items:
        if p.outputs is layout.output_names:
            return layout.output_names
        wanted.update(p.outputs)
    return tuple(n for n in layout.output_names if n in wanted)


def split(layout: Layout, outputs: dict[str, np.ndarray], items: Sequence[Prepared]) -> list[dict[str, np.ndarray]]:
    """Each item's rows of each output it asked for (views, no copy)."""
    if len(items) == 1 or not layout.batches:
        return [{n: outputs[n] for n in p.outputs} for p in items]
    out = []
    row = 0
    for p in items:
        end = row + p.rows
        out.append({n: outputs[n][row:end] for n in p.outputs})
        row = end
    return out


def check_rows(layout: Layout, outputs: dict[str, np.ndarray], rows: int) -> None:
    if not layout.batches:
        return
    for name, arr in outputs.items():
        if arr.ndim == 0 or arr.shape[0] != rows:
            raise errors.Internal(f"model {layout.model!r}: output {name!r} has shape {list(arr.shape)} for {rows} rows")


def row_chunks(rows: int, limit: int) -> list[tuple[int, int]]:
    """[start, end) row ranges of at most `limit` rows covering `rows`."""
    return [(start, min(start + limit, rows)) for start in range(0, rows, limit)]


def add_tensors(layout: Layout, field: Any, outputs: dict[str, np.ndarray]) -> None:
    """Append an item's outputs to a repeated Tensor field (e.g. InferResponse.outputs) with the
    config's datatypes, without building a Tensor per output first."""
    for name, arr in outputs.items():
        datatype = layout.outputs[name].datatype
        if datatype == "BYTES":
            contents = serialize_bytes(np.asarray(arr, dtype=np.object_))
        else:
            dtype = layout.output_dtypes[name]
            contents = (arr if arr.dtype == dtype else arr.astype(dtype)).tobytes()
        field.add(name=name, datatype=datatype, shape=arr.shape, contents=contents)


def to_tensors(layout: Layout, outputs: dict[str, np.ndarray]) -> list[tensor_pb2.Tensor]:
    """An item's outputs as wire tensors, with the config's datatypes."""
    holder = inference_pb2.InferResponse()
    add_tensors(layout, holder.outputs, outputs)
    return list(holder.outputs)
