"""KServe v2 / Open Inference Protocol translation, in Triton's flavour. Plain logic, no transport.

* Infer requests, REST (JSON tensors, and Triton's binary tensor extension: a JSON header of
  `Inference-Header-Content-Length` bytes followed by each binary input's raw bytes in input order, sized
  by its `binary_data_size` parameter) and gRPC (`raw_input_contents` or the typed `contents` fields)
  -> a BatchItem of unimodel Tensors (raw little-endian bytes; BYTES as <u4 length + bytes per element).
* InferResponse -> REST JSON (flat "data" lists) and/or binary outputs, or a gRPC ModelInferResponse with
  `raw_output_contents`, as Triton answers.
* `check_inputs`: a request's tensors against the model's config (names, datatypes, shapes, rows).

Numeric tensors never go through a per-element Python loop: JSON lists are converted by numpy, binary
data is sliced from the body with memoryviews, typed gRPC contents are converted by numpy.
Every error is an InvalidArgument that names the tensor (or field) at fault.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from tritonclient.grpc import service_pb2

from unimodel.core import errors, tensors
from unimodel.core.modelconfig import DATATYPES
from unimodel.gateway import json_body
from unimodel.gateway.auth import Principal
from unimodel.v1 import inference_pb2, model_pb2, tensor_pb2

_U32 = struct.Struct("<I")
_INT_KINDS = frozenset("iu")
# gRPC InferTensorContents field holding each datatype's typed values (FP16 has none: raw only).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
# numpy kinds a JSON "data" list may hold for a datatype ('b' bool, 'i'/'u' integers, 'f' floats).
_JSON_KINDS = {"BOOL": frozenset("b"), "FP16": frozenset("iuf"), "FP32": frozenset("iuf"), "FP64": frozenset("iuf")}
# numpy dtype of each typed gRPC contents field (what its values are read as, before the range check).
_FIELD_DTYPES = {
    "bool_contents": np.dtype(np.bool_), "int_contents": np.dtype(np.int32), "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint32), "uint64_contents": np.dtype(np.uint64),
    "fp32_contents": np.dtype(np.float32), "fp64_contents": np.dtype(np.float64),
}
_REQUEST_FIELDS = frozenset({"id", "parameters", "inputs", "outputs"})
_INPUT_FIELDS = frozenset({"name", "datatype", "shape", "parameters", "data"})
_OUTPUT_FIELDS = frozenset({"name", "parameters"})
_INT32_MAX = 2**31 - 1
MAX_DIMS = 32
"""Dimensions a tensor's shape may have (numpy's limit is 64)."""


def _bad(message: str, field: str = "") -> errors.InvalidArgument:
    return errors.InvalidArgument(message, field=field) if field else errors.InvalidArgument(message)


# ---------------------------------------------------------------------------------------------------
# infer requests
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    binary: bool | None  # REST: the output's own binary_data parameter; None = the request's default


@dataclass(slots=True)
class InferCall:
    """A parsed infer request: the item for the batcher plus what only the gateway needs to answer."""

    item: inference_pb2.BatchItem
    outputs: tuple[RequestedOutput, ...]  # empty: every output of the model, in the worker's order
    binary_output: bool  # REST: request parameter binary_data_output (default for outputs)
    timeout_s: float | None  # Triton's "timeout" request parameter (microseconds), in seconds

    @property
    def id(self) -> str:
        return self.item.id


def check_priority(item: inference_pb2.BatchItem, caller: Principal) -> None:
    """KServe's `priority` parameter moves a request ahead of others in the model's queue: admin keys, and
    keys whose policy sets priority=true, may set it; anyone else gets 403 naming the parameter."""
    if item.priority and not caller.admin and not (caller.policy is not None and caller.policy.priority):
        raise errors.PermissionDenied(
            "parameter 'priority' needs an admin key or an API key whose policy allows priority", field="priority"
        )


def _request_parameters(params: Mapping[str, Any], item: inference_pb2.BatchItem) -> tuple[bool, float | None]:
    """Triton's request parameters: priority, timeout (µs), binary_data_output; sequence batching is
    refused; any other parameter goes to the engine as a string. Returns (binary_output, timeout_s)."""
    binary_output = False
    timeout_s: float | None = None
    for key, value in params.items():
        if key == "priority":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _INT32_MAX:
                raise _bad(f"parameter 'priority' must be a non-negative integer, got {value!r}", "priority")
            item.priority = value
        elif key == "timeout":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise _bad(f"parameter 'timeout' must be a non-negative integer of microseconds, got {value!r}", "timeout")
            timeout_s = value / 1e6 if value else None
        elif key == "binary_data_output":
            if not isinstance(value, bool):
                raise _bad(f"parameter 'binary_data_output' must be a boolean, got {value!r}", "binary_data_output")
            binary_output = value
        elif key == "sequence_id":
            if value not in (0, "", None):
                raise _bad("sequence batching (parameter 'sequence_id') is not supported", "sequence_id")
        elif key in ("sequence_start", "sequence_end"):
            if value:
                raise _bad(f"sequence batching (parameter {key!r}) is not supported", key)
        elif isinstance(value, bool):
            item.parameters[key] = "true" if value else "false"
        elif isinstance(value, (str, int, float)):
            item.parameters[key] = str(value)
        else:
            raise _bad(f"parameter {key!r} must be a string, number or boolean", key)
    return binary_output, timeout_s


def _shape(name: str, shape: Any) -> list[int]:
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        raise _bad(f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}"[:300], name)
    _check_shape(name, shape)
    return shape


def _check_shape(name: str, shape: Sequence[int]) -> None:
    """A shape numpy and protobuf's int64 can hold: at most MAX_DIMS dimensions, each from 0 to 2^31-1, whose
    non-zero ones multiply to at most 2^31-1 elements (a real tensor's data fits in the body limit anyway)."""
    if len(shape) > MAX_DIMS:
        raise _bad(f"input {name!r}: shape has {len(shape)} dimensions, at most {MAX_DIMS} are allowed", name)
    size = 1
    for d in shape:
        if d < 0:
            raise _bad(f"input {name!r}: shape must be non-negative, got {list(shape)}", name)
        size *= d or 1
        if size > _INT32_MAX:
            raise _bad(
                f"input {name!r}: shape {list(shape)} is out of range (each dimension 0 to {_INT32_MAX}, their "
                f"non-zero product at most {_INT32_MAX})"[:400],
                name,
            )


def _count(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _check_bytes_data(view: memoryview, count: int, name: str) -> None:
    """BYTES data must hold exactly `count` elements of <u4 length + bytes."""
    pos, end = 0, len(view)
    for _ in range(count):
        if pos + 4 > end:
            raise _bad(f"input {name!r}: BYTES data ends after fewer than {count} elements", name)
        (length,) = _U32.unpack_from(view, pos)
        pos += 4 + length
        if pos > end:
            raise _bad(f"input {name!r}: a BYTES element runs past the end of the data", name)
    if pos != end:
        raise _bad(f"input {name!r}: {end - pos} bytes of data left after {count} BYTES elements", name)


def _check_raw_size(name: str, datatype: str, shape: Sequence[int], data: memoryview | bytes) -> None:
    count = _count(shape)
    if datatype == "BYTES":
        _check_bytes_data(memoryview(data), count, name)
        return
    expected = count * tensors.element_size(datatype)
    if len(data) != expected:
        raise _bad(
            f"input {name!r}: {len(data)} bytes of data for shape {list(shape)} {datatype} ({expected} bytes expected)",
            name,
        )


def _json_bytes_data(name: str, data: Any, count: int) -> bytes:
    try:
        arr = np.array(data, dtype=np.object_)
    except ValueError:
        raise _bad(f"input {name!r}: data is not a regular (rectangular) list", name) from None
    flat = arr.reshape(-1)
    if arr.ndim == 0 or flat.size != count:
        got = 1 if arr.ndim == 0 else flat.size
        raise _bad(f"input {name!r}: {got} elements in data, the shape holds {count}", name)
    parts: list[bytes] = []
    for element in flat:
        if not isinstance(element, str):
            raise _bad(f"input {name!r}: BYTES data must be strings, got {type(element).__name__}", name)
        encoded = element.encode()
        parts.append(_U32.pack(len(encoded)))
        parts.append(encoded)
    return b"".join(parts)


def _json_numeric_data(name: str, datatype: str, data: Any, count: int) -> bytes:
    dtype = tensors.numpy_dtype(datatype)
    if not isinstance(data, list):
        raise _bad(f"input {name!r}: data must be a list", name)
    try:
        arr = np.asarray(data)
    except ValueError:
        raise _bad(f"input {name!r}: data is not a regular (rectangular) list of numbers", name) from None
    if arr.size != count:
        raise _bad(f"input {name!r}: {arr.size} values in data, the shape holds {count}", name)
    if count == 0:
        return b""
    kinds = _JSON_KINDS.get(datatype, _INT_KINDS)
    if datatype == "UINT64" and arr.dtype.kind in "fO":
        arr = _uint64_values(name, data, arr)
    if arr.dtype.kind not in kinds:
        what = {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers with a fraction"}.get(
            arr.dtype.kind, "values that are not all numbers"
        )
        raise _bad(f"input {name!r}: data holds {what}, which a {datatype} tensor cannot take", name)
    if arr.dtype.kind in _INT_KINDS and dtype.kind in _INT_KINDS:
        info = np.iinfo(dtype)
        if int(arr.min()) < info.min or int(arr.max()) > info.max:
            raise _bad(f"input {name!r}: a value is outside the range of {datatype}", name)
    return arr.astype(dtype, copy=False).tobytes()


def _uint64_values(name: str, data: Any, arr: np.ndarray) -> np.ndarray:
    """numpy reads a list that mixes integers of 2**63 and more with others as float64: take the exact
    integers back (a rare path, so a per-element check is fine)."""
    flat = np.array(data, dtype=np.object_).reshape(-1)
    if not all(type(v) is int for v in flat):
        return arr
    try:
        return np.array(flat.tolist(), dtype=np.uint64)
    except OverflowError:
        raise _bad(f"input {name!r}: a value is outside the range of UINT64", name) from None


def _output_requests(outputs: Any, *, rest: bool) -> tuple[RequestedOutput, ...]:
    if outputs is None:
        return ()
    if not isinstance(outputs, list):
        raise _bad("outputs must be a list", "outputs")
    seen: set[str] = set()
    result = []
    for out in outputs:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str) or not out["name"]:
            raise _bad("each requested output must be an object with a name", "outputs")
        name = out["name"]
        if not _OUTPUT_FIELDS.issuperset(out):
            raise _bad(f"output {name!r}: unknown field(s) {', '.join(sorted(set(out) - _OUTPUT_FIELDS))}", name)
        if name in seen:
            raise _bad(f"output {name!r} is requested twice", name)
        seen.add(name)
        params = out.get("parameters") or {}
        if not isinstance(params, dict):
            raise _bad(f"output {name!r}: parameters must be an object", name)
        binary = _output_parameters(name, params, rest=rest)
        result.append(RequestedOutput(name, binary))
    return tuple(result)


def _output_parameters(name: str, params: Mapping[str, Any], *, rest: bool) -> bool | None:
    binary: bool | None = None
    for key, value in params.items():
        if key == "binary_data" and rest:
            if not isinstance(value, bool):
                raise _bad(f"output {name!r}: parameter binary_data must be a boolean", name)
            binary = value
        elif key == "classification":
            if value:
                raise _bad(f"output {name!r}: the classification extension is not supported", name)
        elif key.startswith("shared_memory"):
            raise _bad(f"output {name!r}: shared memory outputs are not supported", name)
    return binary


def decode_body(raw: bytes, encoding: str, limit: int) -> bytes:
    """The request body, decompressed (gzip / deflate, as tritonclient may send) within the body limit."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding not in ("gzip", "deflate"):
        raise errors.InvalidArgument(f"unsupported Content-Encoding {encoding!r} (gzip, deflate)", field="Content-Encoding")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        body = inflater.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise errors.InvalidArgument(f"malformed {encoding} body: {exc}", field="Content-Encoding") from None
    if len(body) > limit or inflater.unconsumed_tail:
        raise errors.PayloadTooLarge(f"request body exceeds the limit of {limit} bytes once decompressed")
    return body


def parse_rest_infer(body: bytes | bytearray | memoryview, header_length: int | None) -> InferCall:
    """A REST infer body: plain JSON (`header_length` None) or Triton's binary tensor layout, where the
    first `header_length` bytes are the JSON header and the rest the binary inputs in input order."""
    view = memoryview(body)
    if header_length is None:
        header, binary = view, view[:0]
    else:
        if not 0 < header_length <= len(view):
            raise _bad(
                f"Inference-Header-Content-Length {header_length} is outside the body's 1..{len(view)} bytes",
                "Inference-Header-Content-Length",
            )
        header, binary = view[:header_length], view[header_length:]
    request = json_body.parse(header, "the body" if header_length is None else "the body's JSON header")
    if not isinstance(request, dict):
        raise _bad('the infer request must be a JSON object like {"inputs": [...]}')
    if not _REQUEST_FIELDS.issuperset(request):
        unknown = sorted(set(request) - _REQUEST_FIELDS)
        raise _bad(f"unknown field(s) in the infer request: {', '.join(unknown)}", unknown[0])

    item = inference_pb2.BatchItem()
    request_id = request.get("id", "")
    if not isinstance(request_id, str):
        raise _bad("id must be a string", "id")
    item.id = request_id
    params = request.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad("parameters must be an object", "parameters")
    binary_output, timeout_s = _request_parameters(params, item)

    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _bad("inputs must be a non-empty list of tensors", "inputs")
    seen: set[str] = set()
    offset = 0
    for tensor in inputs:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str) or not tensor["name"]:
            raise _bad("each input must be an object with a name", "inputs")
        name = tensor["name"]
        if name in seen:
            raise _bad(f"input {name!r} is given twice", name)
        seen.add(name)
        if not _INPUT_FIELDS.issuperset(tensor):
            raise _bad(f"input {name!r}: unknown field(s) {', '.join(sorted(set(tensor) - _INPUT_FIELDS))}", name)
        datatype = tensor.get("datatype")
        if not isinstance(datatype, str) or datatype not in DATATYPES:
            raise _bad(f"input {name!r}: unknown datatype {datatype!r}; known: {', '.join(sorted(DATATYPES))}", name)
        shape = _shape(name, tensor.get("shape"))
        tparams = tensor.get("parameters") or {}
        if not isinstance(tparams, dict):
            raise _bad(f"input {name!r}: parameters must be an object", name)
        if any(k.startswith("shared_memory") for k in tparams):
            raise _bad(f"input {name!r}: shared memory inputs are not supported", name)
        size = tparams.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise _bad(f"input {name!r}: binary_data_size must be a non-negative integer", name)
            if "data" in tensor:
                raise _bad(f"input {name!r}: give either data or binary_data_size, not both", name)
            if offset + size > len(binary):
                raise _bad(
                    f"input {name!r}: binary_data_size {size} runs past the end of the body "
                    f"({len(binary) - offset} bytes left after the JSON header)",
                    name,
                )
            data = binary[offset : offset + size]
            offset += size
            _check_raw_size(name, datatype, shape, data)
            contents = bytes(data)
        elif "data" in tensor:
            count = _count(shape)
            if datatype == "BYTES":
                contents = _json_bytes_data(name, tensor["data"], count)
            else:
                contents = _json_numeric_data(name, datatype, tensor["data"], count)
        else:
            raise _bad(f"input {name!r} has neither data nor a binary_data_size parameter", name)
        item.inputs.add(name=name, datatype=datatype, shape=shape, contents=contents)
    if offset != len(binary):
        raise _bad(
            f"{len(binary) - offset} bytes of binary data after the JSON header belong to no input "
            "(binary_data_size values do not add up to the body)"
        )
    outputs = _output_requests(request.get("outputs"), rest=True)
    item.outputs.extend(o.name for o in outputs)
    return InferCall(item, outputs, binary_output, timeout_s)


def _grpc_parameter(param: service_pb2.InferParameter) -> Any:
    kind = param.WhichOneof("parameter_choice")
    return None if kind is None else getattr(param, kind)


def parse_grpc_infer(request: service_pb2.ModelInferRequest) -> InferCall:
    """A gRPC ModelInferRequest: each input's data from raw_input_contents (all inputs) or from its typed
    `contents` field."""
    item = inference_pb2.BatchItem(id=request.id)
    params = {k: _grpc_parameter(v) for k, v in request.parameters.items()}
    _binary, timeout_s = _request_parameters(params, item)
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise _bad(f"raw_input_contents holds {len(raw)} entries for {len(request.inputs)} inputs", "raw_input_contents")
    if not request.inputs:
        raise _bad("inputs must not be empty", "inputs")
    seen: set[str] = set()
    for i, tensor in enumerate(request.inputs):
        name, datatype = tensor.name, tensor.datatype
        if not name:
            raise _bad("each input needs a name", "inputs")
        if name in seen:
            raise _bad(f"input {name!r} is given twice", name)
        seen.add(name)
        if datatype not in DATATYPES:
            raise _bad(f"input {name!r}: unknown datatype {datatype!r}; known: {', '.join(sorted(DATATYPES))}", name)
        if any(k.startswith("shared_memory") for k in tensor.parameters):
            raise _bad(f"input {name!r}: shared memory inputs are not supported", name)
        shape = list(tensor.shape)
        _check_shape(name, shape)
        if raw:
            if tensor.HasField("contents"):
                raise _bad(f"input {name!r}: contents must not be set when raw_input_contents is used", name)
            contents = raw[i]
            _check_raw_size(name, datatype, shape, contents)
        else:
            contents = _typed_contents(name, datatype, shape, tensor.contents)
        item.inputs.add(name=name, datatype=datatype, shape=shape, contents=contents)
    names: set[str] = set()
    for out in request.outputs:
        if not out.name or out.name in names:
            raise _bad(f"output {out.name!r} is requested twice or has no name", out.name or "outputs")
        names.add(out.name)
        _output_parameters(out.name, {k: _grpc_parameter(v) for k, v in out.parameters.items()}, rest=False)
        item.outputs.append(out.name)
    outputs = tuple(RequestedOutput(name, None) for name in item.outputs)
    return InferCall(item, outputs, False, timeout_s)


def _typed_contents(name: str, datatype: str, shape: Sequence[int], contents: service_pb2.InferTensorContents) -> bytes:
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise _bad(f"input {name!r}: {datatype} data must be sent in raw_input_contents", name)
    for other in _CONTENTS_FIELD.values():
        if other != field and len(getattr(contents, other)):
            raise _bad(f"input {name!r}: {datatype} data belongs in contents.{field}, not contents.{other}", name)
    values = getattr(contents, field)
    count = _count(shape)
    if len(values) != count:
        raise _bad(f"input {name!r}: {len(values)} values in contents.{field}, the shape holds {count}", name)
    if datatype == "BYTES":
        parts: list[bytes] = []
        for element in values:
            parts.append(_U32.pack(len(element)))
            parts.append(element)
        return b"".join(parts)
    dtype = tensors.numpy_dtype(datatype)
    arr = np.asarray(values, dtype=_FIELD_DTYPES[field])
    if dtype.kind in _INT_KINDS and arr.size and arr.dtype != dtype:
        info = np.iinfo(dtype)
        if int(arr.min()) < info.min or int(arr.max()) > info.max:
            raise _bad(f"input {name!r}: a value is outside the range of {datatype}", name)
    return arr.astype(dtype, copy=False).tobytes()


# ---------------------------------------------------------------------------------------------------
# infer responses
# ---------------------------------------------------------------------------------------------------


def _ordered_outputs(response: inference_pb2.InferResponse, call: InferCall) -> list[tuple[tensor_pb2.Tensor, bool | None]]:
    if not call.outputs:
        return [(t, None) for t in response.outputs]
    by_name = {t.name: t for t in response.outputs}
    result = []
    for wanted in call.outputs:
        tensor = by_name.get(wanted.name)
        if tensor is None:
            raise errors.Internal(f"the worker returned no output {wanted.name!r}")
        result.append((tensor, wanted.binary))
    return result


def _json_values(tensor: tensor_pb2.Tensor) -> Any:
    """An output's values as a flat JSON-ready list (numpy array for numbers, orjson serialises it)."""
    count = _count(tensor.shape)
    if tensor.datatype == "BYTES":
        values = tensors.deserialize_bytes(tensor.contents, count, tensor.name)
        try:
            return [v.decode() for v in values]
        except UnicodeDecodeError:
            raise _bad(
                f"output {tensor.name!r} holds bytes that are not UTF-8; request it with binary_data", tensor.name
            ) from None
    dtype = tensors.numpy_dtype(tensor.datatype)
    if len(tensor.contents) != count * dtype.itemsize:
        raise errors.Internal(f"the worker returned {len(tensor.contents)} bytes for output {tensor.name!r} {list(tensor.shape)}")
    return np.frombuffer(tensor.contents, dtype=dtype)


def render_rest_infer(response: inference_pb2.InferResponse, call: InferCall, model: str, version: str) -> tuple[bytes, int | None]:
    """The REST answer: (body, header length). The header length is None for a plain JSON body; else
    the body is the JSON header followed by the binary outputs (Inference-Header-Content-Length)."""
    outputs = []
    binary_parts: list[bytes] = []
    for tensor, binary in _ordered_outputs(response, call):
        out: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if call.binary_output if binary is None else binary:
            out["parameters"] = {"binary_data_size": len(tensor.contents)}
            binary_parts.append(tensor.contents)
        else:
            out["data"] = _json_values(tensor)
        outputs.append(out)
    doc: dict[str, Any] = {}
    if call.id:
        doc["id"] = call.id
    doc["model_name"] = response.model or model
    doc["model_version"] = response.model_version or version
    doc["outputs"] = outputs
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not binary_parts:
        return header, None
    return b"".join([header, *binary_parts]), len(header)


def render_grpc_infer(
    response: inference_pb2.InferResponse, call: InferCall, model: str, version: str
) -> service_pb2.ModelInferResponse:
    """ModelInferResponse with raw_output_contents, as Triton answers."""
    reply = service_pb2.ModelInferResponse(
        model_name=response.model or model, model_version=response.model_version or version, id=call.id
    )
    for tensor, _binary in _ordered_outputs(response, call):
        reply.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        reply.raw_output_contents.append(tensor.contents)
    return reply


# ---------------------------------------------------------------------------------------------------
# documents: metadata, configuration, statistics
# ---------------------------------------------------------------------------------------------------


def check_inputs(config: model_pb2.ModelConfig, item: inference_pb2.BatchItem) -> int:
    """Every input of the model present once, with the right datatype and shape, all with the same rows;
    returns the rows. Errors name the tensor and what was expected."""
    given = {t.name: t for t in item.inputs}
    if len(given) != len(item.inputs):
        raise errors.InvalidArgument(f"model {config.name!r}: an input tensor is given twice", model=config.name)
    for name in given:
        if not any(spec.name == name for spec in config.inputs):
            expected = ", ".join(s.name for s in config.inputs)
            raise errors.InvalidArgument(
                f"model {config.name!r} has no input {name!r}; its inputs: {expected}", model=config.name, field=name
            )
    rows = 0
    for spec in config.inputs:
        tensor = given.get(spec.name)
        if tensor is None:
            raise errors.InvalidArgument(
                f"input {spec.name!r} of model {config.name!r} is missing ({spec.datatype} {list(spec.dims)})",
                model=config.name, field=spec.name,
            )
        r = tensors.check_input(spec, tensor, config.max_batch_size, config.name)
        if rows and r != rows:
            raise errors.InvalidArgument(
                f"input {spec.name!r} of model {config.name!r}: batch size {r} differs from the other inputs' {rows}",
                model=config.name, field=spec.name,
            )
        rows = r
    outputs = {s.name for s in config.outputs}
    for name in item.outputs:
        if name not in outputs:
            raise errors.InvalidArgument(
                f"model {config.name!r} has no output {name!r}; its outputs: {', '.join(sorted(outputs))}",
                model=config.name, field=name,
            )
    return rows
