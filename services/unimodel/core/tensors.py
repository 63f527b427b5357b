"""Tensor <-> numpy, KServe v2 datatypes, Triton's BYTES element format. Plain logic, no transport.

A Tensor message carries raw little-endian row-major bytes. BYTES tensors hold each element as a
4-byte little-endian length followed by the element (what Triton's binary tensor extension sends),
so the gateway forwards binary request data without re-encoding it.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from unimodel.core import errors
from unimodel.v1 import model_pb2, tensor_pb2

_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
}
_FROM_NUMPY: dict[str, str] = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64", "object": "BYTES",
}
# onnxruntime's type strings (session.get_inputs()[i].type)
ONNX_TYPES: dict[str, str] = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64", "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
    "tensor(int64)": "INT64", "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def numpy_dtype(datatype: str) -> np.dtype:
    try:
        return _TO_NUMPY[datatype]
    except KeyError:
        raise errors.InvalidArgument(f"unknown datatype {datatype!r}") from None


def datatype_of(array: np.ndarray) -> str:
    if array.dtype.kind in ("U", "S", "O"):
        return "BYTES"
    try:
        return _FROM_NUMPY[array.dtype.name]
    except KeyError:
        raise errors.InvalidArgument(f"unsupported array dtype {array.dtype}") from None


def element_size(datatype: str) -> int:
    """Bytes per element; 0 for BYTES (variable)."""
    return 0 if datatype == "BYTES" else numpy_dtype(datatype).itemsize


def num_elements(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def serialize_bytes(array: np.ndarray) -> bytes:
    """BYTES elements (str or bytes), row-major, each as <u4 length + bytes."""
    out = bytearray()
    for item in array.reshape(-1):
        b = item.encode() if isinstance(item, str) else bytes(item)
        out += struct.pack("<I", len(b))
        out += b
    return bytes(out)


def deserialize_bytes(buf: bytes | memoryview, count: int, name: str = "tensor") -> np.ndarray:
    items: list[bytes] = []
    view = memoryview(buf)
    pos = 0
    for _ in range(count):
        if pos + 4 > len(view):
            raise errors.InvalidArgument(f"input {name!r}: BYTES data ends early ({count} elements expected)")
        (n,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if pos + n > len(view):
            raise errors.InvalidArgument(f"input {name!r}: BYTES element runs past the end of the data")
        items.append(bytes(view[pos : pos + n]))
        pos += n
    if pos != len(view):
        raise errors.InvalidArgument(f"input {name!r}: {len(view) - pos} bytes left after {count} BYTES elements")
    arr = np.empty(count, dtype=np.object_)
    arr[:] = items
    return arr


def to_numpy(tensor: tensor_pb2.Tensor) -> np.ndarray:
    """The tensor's data as an array of its shape; raises InvalidArgument naming the tensor on a size
    mismatch."""
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise errors.InvalidArgument(f"input {tensor.name!r}: negative dimension in shape {list(shape)}")
    count = num_elements(shape)
    if tensor.datatype == "BYTES":
        return deserialize_bytes(tensor.contents, count, tensor.name).reshape(shape)
    dtype = numpy_dtype(tensor.datatype)
    expected = count * dtype.itemsize
    if len(tensor.contents) != expected:
        raise errors.InvalidArgument(
            f"input {tensor.name!r}: {len(tensor.contents)} bytes of data for shape {list(shape)} "
            f"{tensor.datatype} ({expected} bytes expected)"
        )
    return np.frombuffer(tensor.contents, dtype=dtype).reshape(shape)


def from_numpy(name: str, array: np.ndarray, datatype: str | None = None) -> tensor_pb2.Tensor:
    datatype = datatype or datatype_of(array)
    if datatype == "BYTES":
        contents = serialize_bytes(np.asarray(array, dtype=np.object_))
    else:
        contents = np.ascontiguousarray(array, dtype=numpy_dtype(datatype)).tobytes()
    return tensor_pb2.Tensor(name=name, datatype=datatype, shape=list(array.shape), contents=contents)


def check_input(spec: model_pb2.TensorSpec, tensor: tensor_pb2.Tensor, max_batch_size: int, model: str) -> int:
    """Check a request tensor against the model's spec; returns its rows along the batch dimension
    (1 for a model that does not batch). Errors name the tensor and what was expected."""
    if tensor.datatype != spec.datatype:
        raise errors.InvalidArgument(
            f"input {spec.name!r} of model {model!r}: datatype {tensor.datatype or '(none)'}, expected {spec.datatype}",
            model=model, field=spec.name,
        )
    shape: list[int] = list(tensor.shape)
    dims: list[int] = list(spec.dims)
    expected = (["-1"] if max_batch_size > 0 else []) + [str(d) for d in dims]
    want = ([-1] if max_batch_size > 0 else []) + dims
    if len(shape) != len(want) or any(w != -1 and w != s for w, s in zip(want, shape, strict=True)):
        raise errors.InvalidArgument(
            f"input {spec.name!r} of model {model!r}: shape {shape}, expected [{', '.join(expected)}]",
            model=model, field=spec.name,
        )
    if max_batch_size > 0:
        rows = shape[0]
        if rows < 1 or rows > max_batch_size:
            raise errors.InvalidArgument(
                f"input {spec.name!r} of model {model!r}: batch size {rows} is outside 1..{max_batch_size}",
                model=model, field=spec.name,
            )
        return rows
    return 1
