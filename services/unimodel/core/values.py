"""JSON values <-> google.protobuf.Value (the wire form of predict inputs and outputs).

Hand-written instead of json_format: 5-10x faster on the hot path, and integral numbers come back as
integers (a JSON number has no int/float distinction; protobuf stores every number as a double).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import struct_pb2

from unimodel.core.errors import InvalidArgument

_MAX_DEPTH = 64


def _fill(value: struct_pb2.Value, obj: Any, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise InvalidArgument(f"input nests deeper than {_MAX_DEPTH} levels", field="input")
    if obj is None:
        value.null_value = struct_pb2.NULL_VALUE
    elif isinstance(obj, bool):
        value.bool_value = obj
    elif isinstance(obj, (int, float)):
        value.number_value = obj
    elif isinstance(obj, str):
        value.string_value = obj
    elif isinstance(obj, (list, tuple)):
        lst = value.list_value
        lst.SetInParent()
        for item in obj:
            _fill(lst.values.add(), item, depth + 1)
    elif isinstance(obj, dict):
        st = value.struct_value
        st.SetInParent()
        for key, item in obj.items():
            if not isinstance(key, str):
                raise InvalidArgument("object keys must be strings", field="input")
            _fill(st.fields[key], item, depth + 1)
    else:
        raise InvalidArgument(f"input holds a {type(obj).__name__}, which is not a JSON value", field="input")


def to_value(obj: Any) -> struct_pb2.Value:
    value = struct_pb2.Value()
    _fill(value, obj, 0)
    return value


def from_value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        n = value.number_value
        return int(n) if n.is_integer() and abs(n) < 2**53 else n
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "list_value":
        return [from_value(v) for v in value.list_value.values]
    if kind == "struct_value":
        return {k: from_value(v) for k, v in value.struct_value.fields.items()}
    return None
