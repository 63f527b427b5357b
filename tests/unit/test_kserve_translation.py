"""kserve/codec.py and kserve/documents.py: KServe v2 REST / gRPC tensors <-> unimodel Tensors, binary tensor extension, documents.

Request bodies are built and responses read with tritonclient's own code (generate_request_body,
parse_response_body, grpc InferResult), so these tests check what the official client sends and reads.
"""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import serialize_byte_tensor

from unimodel.core import errors, modelconfig, tensors
from unimodel.gateway.kserve import codec, documents
from unimodel.gateway.statistics import ModelStatistics
from unimodel.v1 import inference_pb2, tensor_pb2


def _input(name: str, array: np.ndarray, datatype: str, *, binary: bool = True) -> httpclient.InferInput:
    tensor = httpclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def _parse_client_body(inputs: list[httpclient.InferInput], **kw: object) -> codec.InferCall:
    body, header_length = httpclient.InferenceServerClient.generate_request_body(inputs, **kw)
    return codec.parse_rest_infer(body, header_length)


def _array(tensor: tensor_pb2.Tensor) -> np.ndarray:
    return tensors.to_numpy(tensor)


# ---- REST requests ---------------------------------------------------------------------------------


def test_binary_inputs_from_tritonclient_become_raw_tensors() -> None:
    fp = np.arange(12, dtype=np.float32).reshape(3, 4)
    ints = np.array([[1, -2], [3, 4], [5, 6]], dtype=np.int64)
    text = np.array([["héllo"], [""], ["b\x00yte"]], dtype=np.object_)
    call = _parse_client_body(
        [_input("F", fp, "FP32"), _input("I", ints, "INT64", binary=False), _input("S", text, "BYTES")],
        outputs=[httpclient.InferRequestedOutput("O1", binary_data=True), httpclient.InferRequestedOutput("O2", binary_data=False)],
        request_id="req-7",
    )
    f, i, s = call.item.inputs
    assert (f.name, f.datatype, list(f.shape)) == ("F", "FP32", [3, 4])
    assert f.contents == fp.tobytes()
    np.testing.assert_array_equal(_array(i), ints)
    assert (i.datatype, list(i.shape)) == ("INT64", [3, 2])
    assert s.contents == serialize_byte_tensor(text).item()
    assert _array(s).reshape(-1).tolist() == ["héllo".encode(), b"", b"b\x00yte"]
    assert call.id == call.item.id == "req-7"
    assert list(call.item.outputs) == ["O1", "O2"]
    assert [(o.name, o.binary) for o in call.outputs] == [("O1", True), ("O2", False)]
    assert call.binary_output is False


def test_no_outputs_requested_means_all_outputs_in_binary_as_tritonclient_asks() -> None:
    call = _parse_client_body([_input("F", np.ones((1, 2), np.float32), "FP32")])
    assert call.outputs == () and list(call.item.outputs) == [] and call.binary_output is True


@pytest.mark.parametrize(
    ("data", "shape"),
    [([[1, 2, 3], [4, 5, 6]], [2, 3]), ([1, 2, 3, 4, 5, 6], [2, 3]), ([1.5, 2.5], [1, 2]), ([], [0, 3])],
)
def test_json_data_flat_or_nested(data: list, shape: list[int]) -> None:
    body = orjson.dumps({"inputs": [{"name": "X", "datatype": "FP32", "shape": shape, "data": data}]})
    (x,) = codec.parse_rest_infer(body, None).item.inputs
    np.testing.assert_array_equal(_array(x), np.asarray(data, dtype=np.float32).reshape(shape))


@pytest.mark.parametrize(
    ("datatype", "data", "expected"),
    [
        ("BOOL", [True, False], np.array([True, False])),
        ("UINT8", [0, 255], np.array([0, 255], np.uint8)),
        ("INT8", [-128, 127], np.array([-128, 127], np.int8)),
        ("INT16", [-1, 2], np.array([-1, 2], np.int16)),
        ("UINT64", [2**64 - 1, 0], np.array([2**64 - 1, 0], np.uint64)),
        ("FP16", [0.5, 2], np.array([0.5, 2], np.float16)),
        ("FP64", [1e300, -1], np.array([1e300, -1], np.float64)),
        ("BYTES", ["a", "ü"], np.array([b"a", "ü".encode()], np.object_)),
    ],
)
def test_json_data_of_every_datatype(datatype: str, data: list, expected: np.ndarray) -> None:
    body = orjson.dumps({"inputs": [{"name": "X", "datatype": datatype, "shape": [2], "data": data}]})
    (x,) = codec.parse_rest_infer(body, None).item.inputs
    got = _array(x)
    assert got.dtype == (expected.dtype if datatype != "BYTES" else np.object_)
    assert got.tolist() == expected.tolist()


def test_request_parameters_priority_timeout_and_custom() -> None:
    body = orjson.dumps({
        "id": "abc",
        "parameters": {"priority": 2, "timeout": 250000, "binary_data_output": True, "temperature": 0.5, "flag": False, "tag": "x"},
        "inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [1]}],
    })
    call = codec.parse_rest_infer(body, None)
    assert call.item.priority == 2 and call.timeout_s == 0.25 and call.binary_output is True
    assert dict(call.item.parameters) == {"temperature": "0.5", "flag": "false", "tag": "x"}
    assert call.item.id == "abc"


def _header_body(header: dict, *chunks: bytes) -> tuple[bytes, int]:
    raw = orjson.dumps(header)
    return raw + b"".join(chunks), len(raw)


X1 = {"name": "X", "datatype": "FP32", "shape": [1, 2]}


@pytest.mark.parametrize(
    ("body", "header_length", "needle"),
    [
        (b'{"inputs": [', None, "the body is not valid JSON"),
        (b'{"in\0\0\0\0', 4, "the body's JSON header is not valid JSON"),
        (b"[1, 2]", None, "JSON object"),
        (b'{"inputs": [], "extra": 1}', None, "unknown field(s) in the infer request: extra"),
        (b'{"inputs": []}', None, "inputs must be a non-empty list"),
        (b'{"inputs": [{"datatype": "FP32"}]}', None, "with a name"),
        (b'{"inputs": [{"name": "X", "datatype": "FP99", "shape": [1], "data": [1]}]}', None, "input 'X': unknown datatype 'FP99'"),
        (b'{"inputs": [{"name": "X", "datatype": ["FP32"], "shape": [1], "data": [1]}]}', None, "input 'X': unknown datatype"),
        (b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [-1], "data": [1]}]}', None, "input 'X': shape must be"),
        (b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3]}]}', None,
         "input 'X': 3 values in data, the shape holds 4"),
        (b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3]]}]}', None,
         "input 'X': data is not a regular"),
        (b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [2], "data": ["a", 2]}]}', None,
         "input 'X': data holds values that are not all numbers"),
        (b'{"inputs": [{"name": "X", "datatype": "INT32", "shape": [2], "data": [1.5, 2]}]}', None,
         "input 'X': data holds numbers with a fraction"),
        (b'{"inputs": [{"name": "X", "datatype": "BOOL", "shape": [1], "data": [1]}]}', None, "input 'X': data holds integers"),
        (b'{"inputs": [{"name": "X", "datatype": "UINT8", "shape": [1], "data": [256]}]}', None, "input 'X': a value is outside"),
        (b'{"inputs": [{"name": "X", "datatype": "BYTES", "shape": [1], "data": [5]}]}', None, "input 'X': BYTES data must be strings"),
        (b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": 5}]}', None, "input 'X': data must be a list"),
        (b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [1]}]}', None, "input 'X' has neither data nor"),
        (b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [1]}, '
         b'{"name": "X", "datatype": "FP32", "shape": [1], "data": [1]}]}', None, "input 'X' is given twice"),
        (b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [1], "extra": 1}]}', None, "input 'X': unknown field"),
        (b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [1]}], "outputs": [{"name": "O"}, {"name": "O"}]}',
         None, "output 'O' is requested twice"),
        (b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [1]}], '
         b'"outputs": [{"name": "O", "parameters": {"classification": 3}}]}', None, "classification extension is not supported"),
        (b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "parameters": {"shared_memory_region": "r"}}]}',
         None, "input 'X': shared memory inputs are not supported"),
        (b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [1]}], "parameters": {"sequence_id": 5}}',
         None, "sequence batching"),
        (b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [1]}], "parameters": {"priority": -1}}',
         None, "priority"),
        (b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [1]}], "parameters": {"timeout": "soon"}}',
         None, "timeout"),
        (b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [1]}], "parameters": {"p": [1]}}',
         None, "parameter 'p' must be"),
        (b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [1]}], "id": 5}', None, "id must be a string"),
        # binary tensor extension
        (*_header_body({"inputs": [{**X1, "parameters": {"binary_data_size": 8}}]}, b"\0" * 8)[:1], 500,
         "Inference-Header-Content-Length 500 is outside the body"),
        (*_header_body({"inputs": [{**X1, "parameters": {"binary_data_size": 8}}]}, b"\0" * 8)[:1], 0,
         "Inference-Header-Content-Length 0 is outside"),
        (*_header_body({"inputs": [{**X1, "parameters": {"binary_data_size": 12}}]}, b"\0" * 12),
         "input 'X': 12 bytes of data for shape [1, 2] FP32 (8 bytes expected)"),
        (*_header_body({"inputs": [{**X1, "parameters": {"binary_data_size": 8}}]}, b"\0" * 4),
         "input 'X': binary_data_size 8 runs past the end of the body (4 bytes left"),
        (*_header_body({"inputs": [{**X1, "parameters": {"binary_data_size": 8}}]}, b"\0" * 12),
         "4 bytes of binary data after the JSON header belong to no input"),
        (*_header_body({"inputs": [{**X1, "data": [1, 2], "parameters": {"binary_data_size": 8}}]}, b"\0" * 8),
         "input 'X': give either data or binary_data_size"),
        (*_header_body({"inputs": [{**X1, "parameters": {"binary_data_size": -8}}]}, b"\0" * 8),
         "input 'X': binary_data_size must be a non-negative integer"),
        (*_header_body({"inputs": [{"name": "S", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 6}}]},
                       b"\x02\0\0\0ab"), "input 'S': BYTES data ends after fewer than 2 elements"),
        (*_header_body({"inputs": [{"name": "S", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 5}}]},
                       b"\x09\0\0\0a"), "input 'S': a BYTES element runs past the end"),
        (*_header_body({"inputs": [{"name": "S", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 7}}]},
                       b"\x01\0\0\0abc"), "input 'S': 2 bytes of data left after 1 BYTES elements"),
    ],
)
def test_bad_rest_requests_are_invalid_argument_naming_the_culprit(body: bytes, header_length: int | None, needle: str) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        codec.parse_rest_infer(body, header_length)
    assert needle in info.value.message


# ---- REST responses --------------------------------------------------------------------------------


def _reply(*outputs: tensor_pb2.Tensor, model: str = "m", version: str = "") -> inference_pb2.InferResponse:
    return inference_pb2.InferResponse(model=model, model_version=version, outputs=outputs, worker_id="w")


def _call(outputs: tuple[codec.RequestedOutput, ...] = (), binary_output: bool = False, id: str = "") -> codec.InferCall:
    return codec.InferCall(inference_pb2.BatchItem(id=id), outputs, binary_output, None)


OUT_F = tensors.from_numpy("F", np.array([[1.5, -2.0], [3.0, 4.25]], np.float32))
OUT_S = tensors.from_numpy("S", np.array(["héllo", "wörld"], np.object_), "BYTES")
OUT_B = tensors.from_numpy("B", np.array([True, False]))
OUT_H = tensors.from_numpy("H", np.array([0.5, 1.0], np.float16))


def test_json_response_has_flat_data_and_echoes_the_id() -> None:
    body, header_length = codec.render_rest_infer(_reply(OUT_F, OUT_S, OUT_B, OUT_H), _call(id="x1"), "m", "1")
    assert header_length is None
    doc = orjson.loads(body)
    assert doc == {
        "id": "x1", "model_name": "m", "model_version": "1",
        "outputs": [
            {"name": "F", "datatype": "FP32", "shape": [2, 2], "data": [1.5, -2.0, 3.0, 4.25]},
            {"name": "S", "datatype": "BYTES", "shape": [2], "data": ["héllo", "wörld"]},
            {"name": "B", "datatype": "BOOL", "shape": [2], "data": [True, False]},
            {"name": "H", "datatype": "FP16", "shape": [2], "data": [0.5, 1.0]},
        ],
    }
    result = httpclient.InferenceServerClient.parse_response_body(body)
    np.testing.assert_array_equal(result.as_numpy("F"), tensors.to_numpy(OUT_F))
    assert result.get_response()["id"] == "x1"


def test_binary_response_is_read_by_tritonclient() -> None:
    wanted = (codec.RequestedOutput("S", True), codec.RequestedOutput("F", None), codec.RequestedOutput("B", False))
    body, header_length = codec.render_rest_infer(_reply(OUT_F, OUT_S, OUT_B), _call(wanted, binary_output=True), "m", "1")
    assert header_length is not None
    header = orjson.loads(body[:header_length])
    assert [o["name"] for o in header["outputs"]] == ["S", "F", "B"]  # the requested order
    assert header["outputs"][1]["parameters"] == {"binary_data_size": 16} and "data" in header["outputs"][2]
    result = httpclient.InferenceServerClient.parse_response_body(body, header_length=header_length)
    np.testing.assert_array_equal(result.as_numpy("F"), tensors.to_numpy(OUT_F))
    assert result.as_numpy("S").tolist() == ["héllo".encode(), "wörld".encode()]
    assert result.as_numpy("B").tolist() == [True, False]


def test_response_without_a_requested_output_is_internal() -> None:
    with pytest.raises(errors.Internal, match="no output 'Z'"):
        codec.render_rest_infer(_reply(OUT_F), _call((codec.RequestedOutput("Z", None),)), "m", "1")


def test_non_utf8_bytes_output_needs_binary() -> None:
    raw = tensor_pb2.Tensor(name="S", datatype="BYTES", shape=[1], contents=b"\x02\0\0\0\xff\xfe")
    with pytest.raises(errors.InvalidArgument, match="binary_data"):
        codec.render_rest_infer(_reply(raw), _call(), "m", "1")
    body, n = codec.render_rest_infer(_reply(raw), _call(binary_output=True), "m", "1")
    assert body[n:] == raw.contents


# ---- gRPC --------------------------------------------------------------------------------------------


def _grpc_request(**inputs: tuple[str, np.ndarray]) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="m", id="g1")
    for name, (datatype, array) in inputs.items():
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(
            serialize_byte_tensor(array).item() if datatype == "BYTES" else array.tobytes()
        )
    return request


def test_grpc_raw_input_contents() -> None:
    fp = np.arange(6, dtype=np.float32).reshape(2, 3)
    text = np.array([b"a", b"bc"], dtype=np.object_)
    request = _grpc_request(F=("FP32", fp), S=("BYTES", text))
    request.outputs.add(name="O")
    request.parameters["priority"].uint64_param = 1
    request.parameters["timeout"].int64_param = 1000
    call = codec.parse_grpc_infer(request)
    f, s = call.item.inputs
    assert f.contents == fp.tobytes() and list(f.shape) == [2, 3]
    assert _array(s).tolist() == [b"a", b"bc"]
    assert call.item.id == "g1" and list(call.item.outputs) == ["O"]
    assert call.item.priority == 1 and call.timeout_s == 0.001


@pytest.mark.parametrize(
    ("datatype", "field", "values"),
    [
        ("FP32", "fp32_contents", [1.5, -2.0]), ("FP64", "fp64_contents", [1e100, 2.0]),
        ("INT8", "int_contents", [-3, 4]), ("INT32", "int_contents", [2**31 - 1, -(2**31)]),
        ("INT64", "int64_contents", [2**40, -1]), ("UINT16", "uint_contents", [65535, 0]),
        ("UINT64", "uint64_contents", [2**64 - 1, 1]), ("BOOL", "bool_contents", [True, False]),
        ("BYTES", "bytes_contents", [b"x", b""]),
    ],
)
def test_grpc_typed_contents(datatype: str, field: str, values: list) -> None:
    request = service_pb2.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="X", datatype=datatype, shape=[2])
    getattr(tensor.contents, field).extend(values)
    (x,) = codec.parse_grpc_infer(request).item.inputs
    assert _array(x).tolist() == values


@pytest.mark.parametrize(
    ("build", "needle"),
    [
        (lambda r: (r.inputs.add(name="X", datatype="FP16", shape=[1]),), "FP16 data must be sent in raw_input_contents"),
        (lambda r: r.inputs.add(name="X", datatype="FP32", shape=[2]).contents.fp32_contents.append(1.0),
         "input 'X': 1 values in contents.fp32_contents, the shape holds 2"),
        (lambda r: r.inputs.add(name="X", datatype="INT32", shape=[1]).contents.fp32_contents.append(1.0),
         "input 'X': INT32 data belongs in contents.int_contents"),
        (lambda r: r.inputs.add(name="X", datatype="INT8", shape=[1]).contents.int_contents.append(300),
         "input 'X': a value is outside the range of INT8"),
        (lambda r: (r.inputs.add(name="X", datatype="FP32", shape=[2]), r.raw_input_contents.append(b"\0" * 4)),
         "input 'X': 4 bytes of data for shape [2] FP32 (8 bytes expected)"),
        (lambda r: (r.inputs.add(name="X", datatype="FP32", shape=[1]), r.inputs.add(name="Y", datatype="FP32", shape=[1]),
                    r.raw_input_contents.append(b"\0" * 4)), "raw_input_contents holds 1 entries for 2 inputs"),
        (lambda r: (r.inputs.add(name="X", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0),
                    r.raw_input_contents.append(b"\0" * 4)), "input 'X': contents must not be set"),
        (lambda r: None, "inputs must not be empty"),
        (lambda r: (r.inputs.add(name="X", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0),
                    r.outputs.add(name="O"), r.outputs.add(name="O")), "requested twice"),
        (lambda r: (r.inputs.add(name="X", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0),
                    r.parameters["sequence_id"].MergeFrom(service_pb2.InferParameter(int64_param=9))), "sequence batching"),
    ],
)
def test_bad_grpc_requests(build, needle: str) -> None:
    request = service_pb2.ModelInferRequest(model_name="m")
    build(request)
    with pytest.raises(errors.InvalidArgument) as info:
        codec.parse_grpc_infer(request)
    assert needle in info.value.message


def test_grpc_response_has_raw_output_contents_read_by_tritonclient() -> None:
    call = _call((codec.RequestedOutput("S", None), codec.RequestedOutput("F", None)), id="g1")
    reply = codec.render_grpc_infer(_reply(OUT_F, OUT_S, version="2"), call, "m", "1")
    assert (reply.model_name, reply.model_version, reply.id) == ("m", "2", "g1")
    assert [o.name for o in reply.outputs] == ["S", "F"] and len(reply.raw_output_contents) == 2
    result = grpcclient.InferResult(reply)
    np.testing.assert_array_equal(result.as_numpy("F"), tensors.to_numpy(OUT_F))
    assert result.as_numpy("S").tolist() == ["héllo".encode(), "wörld".encode()]


# ---- documents --------------------------------------------------------------------------------------


def _config(**kw: object) -> object:
    base = {"name": "m", "inputs": [{"name": "I", "datatype": "INT64", "dims": [-1, 3]}],
            "outputs": [{"name": "O", "datatype": "BYTES", "dims": [1]}]}
    return modelconfig.parse({**base, **kw})


def test_metadata_adds_the_batch_dimension_only_when_the_model_batches() -> None:
    assert documents.model_metadata("m", _config(max_batch_size=16)) == {
        "name": "m", "versions": ["1"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "I", "datatype": "INT64", "shape": [-1, -1, 3]}],
        "outputs": [{"name": "O", "datatype": "BYTES", "shape": [-1, 1]}],
    }
    doc = documents.model_metadata("m", _config(max_batch_size=0, engine="delay", version="7"))
    assert doc["inputs"][0]["shape"] == [-1, 3] and doc["versions"] == ["7"] and doc["platform"] == "unimodel_delay"
    assert documents.model_metadata("echo", None) == {"name": "echo", "versions": ["1"], "platform": "unimodel", "inputs": [], "outputs": []}
    proto = documents.model_metadata_proto("m", _config(max_batch_size=16))
    assert list(proto.inputs[0].shape) == [-1, -1, 3] and proto.platform == "onnxruntime_onnx"


def test_model_config_in_triton_vocabulary() -> None:
    config = _config(
        max_batch_size=32, execution_provider="cuda", instance_count=2, options={"k": "v"},
        batching={"max_queue_delay_ms": 2.5, "preferred_batch_sizes": [8, 16], "priority_levels": 3,
                  "max_queue_size": 100, "default_timeout_ms": 40},
        processing={"kind": "tabular"},
    )
    doc = documents.model_config(config)
    assert doc["name"] == "m" and doc["platform"] == "onnxruntime_onnx" and doc["backend"] == "onnxruntime"
    assert doc["max_batch_size"] == 32
    assert doc["input"][0] == {"name": "I", "data_type": "TYPE_INT64", "format": "FORMAT_NONE", "dims": [-1, 3],
                               "is_shape_tensor": False, "allow_ragged_batch": False, "optional": False}
    assert doc["output"][0]["data_type"] == "TYPE_STRING" and doc["output"][0]["dims"] == [1]
    assert doc["dynamic_batching"] == {
        "preferred_batch_size": [8, 16], "max_queue_delay_microseconds": 2500, "preserve_ordering": False,
        "priority_levels": 3, "default_priority_level": 3,
        "default_queue_policy": {"timeout_action": "REJECT", "default_timeout_microseconds": 40000,
                                 "allow_timeout_override": True, "max_queue_size": 100},
    }
    assert doc["instance_group"] == [{"name": "m_0", "kind": "KIND_GPU", "count": 2}]
    assert doc["parameters"] == {"k": {"string_value": "v"}, "processing": {"string_value": "tabular"}}
    assert doc["model_transaction_policy"] == {"decoupled": False}
    proto = documents.model_config_proto(config)
    assert proto.dynamic_batching.max_queue_delay_microseconds == 2500 and list(proto.input[0].dims) == [-1, 3]
    assert "dynamic_batching" not in documents.model_config(_config(max_batch_size=0))


def test_versions() -> None:
    assert documents.model_version(_config(version="12")) == "12"
    assert documents.model_version(_config(version="v2")) == "1"  # perf_analyzer parses versions as integers
    assert documents.model_version(None) == "1"
    documents.check_version(_config(version="v2"), "m", "v2")
    documents.check_version(_config(version="v2"), "m", "1")
    documents.check_version(_config(), "m", "")
    with pytest.raises(errors.NotFound, match="model 'm' has no version '2'; it serves version 1"):
        documents.check_version(_config(), "m", "2")


def test_server_metadata_lists_the_extensions_implemented() -> None:
    assert documents.server_metadata("9.9") == {
        "name": "unimodel", "version": "9.9",
        "extensions": ["binary_tensor_data", "model_configuration", "schedule_policy", "statistics"],
    }


def test_statistics_entry_has_every_field_perf_analyzer_reads() -> None:
    stats = ModelStatistics(clock_ms=lambda: 1234)
    stats.record("m", True, 5000, 3)
    entry = documents.statistics_entry("m", "1", stats.snapshot("m"))
    assert entry["name"] == "m" and entry["version"] == "1" and entry["last_inference"] == 1234
    assert entry["inference_count"] == 3 and entry["execution_count"] == 1
    for key in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss"):
        assert set(entry["inference_stats"][key]) == {"count", "ns"}
    assert entry["inference_stats"]["success"] == {"count": 1, "ns": 5000}
    proto = documents.statistics_proto([entry])
    assert proto.model_stats[0].inference_stats.success.ns == 5000
