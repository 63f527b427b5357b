"""Numeric arrays to and from google.protobuf.Value without a Python object per number.

A list of numbers is, on the wire, one 11-byte record per element: ListValue.values tag (0x0A), length 9,
Value.number_value tag (0x11) and the little-endian double. Building / reading that with numpy is 20-50x
faster for an embedding or a 384-feature row. Used by the worker's processors, the gateway's embeddings
API and the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from google.protobuf import struct_pb2

from unimodel.core import errors
from unimodel.core.protowire import varint
from unimodel.core.values import from_value, to_value

_NUMBER = np.dtype([("tag", "u1"), ("len", "u1"), ("ntag", "u1"), ("v", "<f8")])


def _number_records(arr: np.ndarray) -> np.ndarray:
    rec = np.empty(arr.shape, dtype=_NUMBER)
    rec["tag"] = 0x0A
    rec["len"] = 9
    rec["ntag"] = 0x11
    rec["v"] = arr
    return rec


def array_value(arr: np.ndarray) -> struct_pb2.Value:
    """A numeric array as a (nested) JSON list Value; other arrays through Python lists."""
    arr = np.asarray(arr)
    if arr.dtype.kind in "iuf" and arr.ndim <= 2:
        if arr.ndim == 0:
            return struct_pb2.Value(number_value=float(arr))
        if arr.ndim == 1:
            body = _number_records(arr).tobytes()
            return struct_pb2.Value.FromString(b"\x32" + varint(len(body)) + body)
        rows, n = arr.shape
        row_body = 11 * n
        row_value = b"\x32" + varint(row_body)  # a row's Value: list_value tag + length
        head = b"\x0a" + varint(len(row_value) + row_body) + row_value  # as an element of the outer list
        buf = np.empty((rows, len(head) + row_body), dtype=np.uint8)
        buf[:, : len(head)] = np.frombuffer(head, dtype=np.uint8)
        buf[:, len(head) :] = _number_records(arr).view(np.uint8).reshape(rows, row_body)
        body = buf.tobytes()
        return struct_pb2.Value.FromString(b"\x32" + varint(len(body)) + body)
    return to_value(_plain(arr.tolist()))


def _plain(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    if isinstance(obj, list):
        return [_plain(x) for x in obj]
    return obj


def numbers(value: struct_pb2.Value) -> np.ndarray | None:
    """A flat list of numbers as float64 without a Python object per number; None when `value` is not
    a (non-empty) flat list of numbers."""
    if value.WhichOneof("kind") != "list_value":
        return None
    lv = value.list_value
    n = len(lv.values)
    if n == 0:
        return None
    raw = lv.SerializeToString()
    if len(raw) != 11 * n or raw[0::11] != b"\x0a" * n or raw[1::11] != b"\x09" * n or raw[2::11] != b"\x11" * n:
        return None
    return np.ndarray((n,), dtype="<f8", buffer=raw, offset=3, strides=(11,))


def numeric_array(value: struct_pb2.Value, dtype: np.dtype, what: str) -> np.ndarray:
    """A (nested) list of numbers as an array of `dtype`; InvalidArgument when it is not one."""
    flat = numbers(value)
    if flat is not None:
        return flat.astype(dtype, copy=False)
    if value.WhichOneof("kind") == "list_value":
        rows = [numbers(v) for v in value.list_value.values]
        arrays = [r for r in rows if r is not None]
        if rows and len(arrays) == len(rows) and len({len(r) for r in arrays}) == 1:
            return np.stack(arrays).astype(dtype, copy=False)
    obj = from_value(value)
    try:
        arr = np.asarray(obj)
    except ValueError:
        raise errors.InvalidArgument(f"{what}: not a rectangular list (rows of different lengths)") from None
    if arr.dtype.kind not in "biuf" or (arr.dtype.kind == "b" and dtype.kind != "b"):
        raise errors.InvalidArgument(f"{what}: expected numbers")
    return arr.astype(dtype, copy=False)


def texts_value(texts: Sequence[str]) -> struct_pb2.Value:
    """A list of strings as a Value: the input of a text-embedding model's predict request."""
    value = struct_pb2.Value()
    value.list_value.values.extend(struct_pb2.Value(string_value=t) for t in texts)
    return value


def embeddings_of(output: struct_pb2.Value) -> tuple[np.ndarray, np.ndarray] | None:
    """(float32 vectors [n, dim], token counts [n]) from a text-embedding model's answer to a list of
    texts; None when the answer is not one (the caller says why in its own terms)."""
    fields = output.struct_value.fields
    if "embeddings" not in fields:
        return None
    vectors = numeric_array(fields["embeddings"], np.dtype(np.float32), "embeddings")
    tokens = numeric_array(fields["tokens"], np.dtype(np.int64), "tokens") if "tokens" in fields else np.zeros(1, np.int64)
    return vectors, tokens
