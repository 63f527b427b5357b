"""Issue 15, input limits (no network): integers range-checked before protobuf, the nesting limit
measured against the protobuf runtime itself, and the batcher's reading of items it cannot decode."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from google.protobuf.message import DecodeError

from unimodel.batcher import wire
from unimodel.core import errors
from unimodel.core.protowire import varint
from unimodel.core.values import MAX_DEPTH, check_depth, to_value
from unimodel.gateway import json_body
from unimodel.gateway.kserve import codec
from unimodel.gateway.openai.protocol import ChatCompletionBody, chat_request
from unimodel.v1 import inference_pb2


def _objects(levels: int, leaf: object = None) -> object:
    """`levels` nested objects; the innermost is empty, or holds `leaf`."""
    value: object = {} if leaf is None else {"a": leaf}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def _lists(levels: int, leaf: object = None) -> object:
    value: object = [] if leaf is None else [leaf]
    for _ in range(levels - 1):
        value = [value]
    return value


def _chat(**fields: object) -> bytes:
    import json

    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


@pytest.mark.parametrize(
    ("field", "value", "bound"),
    [("top_k", 3_000_000_000, "2147483647"), ("top_k", -1, "0 to"), ("seed", 2**63, "9223372036854775807"),
     ("seed", -(2**64), "-9223372036854775808")],
)
def test_finding_chat_integers_out_of_range_are_invalid_arguments(field: str, value: int, bound: str) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        chat_request(json_body.parse_model(_chat(**{field: value}), ChatCompletionBody), "")
    assert info.value.metadata["field"] == field
    assert bound in info.value.message and "out of range" in info.value.message


def test_integers_in_range_reach_the_request() -> None:
    request = chat_request(json_body.parse_model(_chat(seed=2**63 - 1, top_k=2**31 - 1), ChatCompletionBody), "")
    assert request.sampling.seed == 2**63 - 1 and request.sampling.top_k == 2**31 - 1


def test_openapi_documents_the_ranges() -> None:
    schema = ChatCompletionBody.model_json_schema()["properties"]
    assert {"minimum": 0, "maximum": 2**31 - 1}.items() <= schema["top_k"]["anyOf"][0].items()
    assert schema["seed"]["anyOf"][0]["maximum"] == 2**63 - 1


@pytest.mark.parametrize("shape", [[0, 18446744073709551615], [0, 2**31], [2**16, 2**16], [1] * 33, [-1]])
def test_finding_kserve_shape_out_of_range_is_an_invalid_argument(shape: list[int]) -> None:
    import json

    body = json.dumps({"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": []}]}).encode()
    with pytest.raises(errors.InvalidArgument) as info:
        codec.parse_rest_infer(body, None)
    assert info.value.metadata["field"] == "x"


def test_kserve_grpc_shape_out_of_range_is_an_invalid_argument() -> None:
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[0, 2**63 - 1])
    request.raw_input_contents.append(b"")
    with pytest.raises(errors.InvalidArgument, match="out of range"):
        codec.parse_grpc_infer(request)


@pytest.mark.parametrize("build", [_objects, _lists])
def test_the_deepest_value_allowed_decodes_in_every_message_it_travels_in(build: Callable[..., object]) -> None:
    """MAX_DEPTH is what the protobuf runtime decodes: the deepest value to_value takes (objects cost the
    most) decodes inside a BatchRequest and an ItemBundle, the next level is refused."""
    for value in (build(MAX_DEPTH + 1), build(MAX_DEPTH, leaf=1)):
        encoded = to_value(value)
        item = inference_pb2.BatchItem(input=encoded)
        for outer in (inference_pb2.BatchRequest(items=[item]), inference_pb2.ItemBundle(items=[item])):
            assert type(outer).FromString(outer.SerializeToString()).items[0].input == encoded
        check_depth(encoded)
    for value in (build(MAX_DEPTH + 2), build(MAX_DEPTH + 1, leaf=1)):
        with pytest.raises(errors.InvalidArgument, match="nests deeper than 32"):
            to_value(value)


def test_the_runtime_limit_is_what_max_depth_assumes() -> None:
    """One more object level than MAX_DEPTH no longer decodes inside a BatchRequest: if protobuf's limit
    grows, MAX_DEPTH may too; if it shrinks, this fails first."""
    import unimodel.core.values as values

    deeper = values.MAX_DEPTH
    try:
        values.MAX_DEPTH = 99
        encoded = to_value(_objects(deeper + 2))
    finally:
        values.MAX_DEPTH = deeper
    request = inference_pb2.BatchRequest(items=[inference_pb2.BatchItem()]).SerializeToString()
    item = inference_pb2.BatchItem(reply_to="x").SerializeToString() + b"\x12" + varint(encoded.ByteSize()) + encoded.SerializeToString()
    request = b"\x1a" + varint(len(item)) + item
    with pytest.raises(DecodeError):
        inference_pb2.BatchRequest.FromString(request)
    with pytest.raises(errors.InvalidArgument):
        check_depth(encoded)


def test_check_depth_walks_every_branch() -> None:
    wide = [1, [2, {"x": [3]}], _lists(MAX_DEPTH - 1, leaf=1)]
    check_depth(to_value(wide))
    import unimodel.core.values as values

    deeper = values.MAX_DEPTH
    try:
        values.MAX_DEPTH = 99
        too_deep = to_value([1, {"b": 2}, [[3]], _lists(MAX_DEPTH + 1, leaf="x")])
    finally:
        values.MAX_DEPTH = deeper
    with pytest.raises(errors.InvalidArgument, match="nests deeper"):
        check_depth(too_deep)


def test_finding_batcher_reads_the_reply_to_of_an_item_it_cannot_decode() -> None:
    deep = b"\x11" + b"\x00" * 8
    for _ in range(60):
        inner = b"\x0a" + varint(len(deep)) + deep
        deep = b"\x32" + varint(len(inner)) + inner
    data = inference_pb2.BatchItem(request_id="r", reply_to="_INBOX.a.b", rows=1).SerializeToString()
    data += b"\x12" + varint(len(deep)) + deep
    with pytest.raises(DecodeError):
        wire.decode_item(data)
    assert wire.reply_to_of(data) == "_INBOX.a.b"


def test_decode_item_is_an_ordinary_decode_for_ordinary_items() -> None:
    item = inference_pb2.BatchItem(request_id="r", reply_to="inbox", input=to_value({"a": [1, 2]}), rows=1)
    assert wire.decode_item(item.SerializeToString()) == item
    assert wire.reply_to_of(item.SerializeToString()) == "inbox"


@pytest.mark.parametrize("data", [b"", b"\xff", b"\x2a\x05ab", b"\x2a", b"\xff" * 12, b"\x0b\x0c"])
def test_reply_to_of_garbage_is_empty(data: bytes) -> None:
    assert wire.reply_to_of(data) == ""


@pytest.mark.parametrize("ids", [[2**63], [-(2**63) - 1], [1, 2**64]])
def test_modelcache_entry_ids_out_of_range_are_a_bad_request(ids: list[int]) -> None:
    """Found by hand next to the fuzzers (POST /modelcache answered 503 "internal error" with a traceback)."""
    from unimodel.gateway.modelcache import protocol

    data = {"type": "remove", "scope": {"model": "m"}, "remove_type": "delete_by_id", "id_list": ids}
    with pytest.raises(protocol.BadRequest, match="9223372036854775807"):
        protocol.remove_request(data, "")


def test_registration_refuses_a_nul_in_a_name() -> None:
    """Found by schemathesis: POST /v1/models {"name": "\\u0000"} answered 500 (os.path raised ValueError)."""
    from unimodel.gateway.admin import registration

    for body in ({"name": "a\x00b"}, {"path": "a\x00b"}):
        with pytest.raises(errors.InvalidArgument, match="NUL"):
            registration.resolve(body, "/nonexistent-repository", "/nonexistent-root")


async def test_a_grpc_request_that_does_not_decode_is_refused_before_the_servicer() -> None:
    """grpc_decode.guard: the deserializer never raises (grpc.aio would answer UNKNOWN), and the servicer is
    not called with what did not decode; the call is aborted INVALID_ARGUMENT with our details."""
    import grpc

    from unimodel.core import grpc_decode
    from unimodel.core.grpc_server import status_trailers

    called: list[object] = []

    async def predict(request: object, context: object) -> object:
        called.append(request)
        return request

    handler = grpc.unary_unary_rpc_method_handler(predict, inference_pb2.PredictRequest.FromString, None)
    guarded = grpc_decode.guard(handler, status_trailers(grpc_decode.ERROR))
    deep = b"\x11" + b"\x00" * 8
    for _ in range(60):
        inner = b"\x0a" + varint(len(deep)) + deep
        deep = b"\x32" + varint(len(inner)) + inner
    assert guarded.request_deserializer(b"\x12" + varint(len(deep)) + deep) is grpc_decode.UNDECODABLE
    assert guarded.request_deserializer(b"\xff\xff") is grpc_decode.UNDECODABLE

    class Aborted(Exception):
        pass

    class Context:  # the one call the guard makes on a grpc.aio.ServicerContext
        async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: object = ()) -> None:
            raise Aborted(code, details)

    with pytest.raises(Aborted) as info:
        await guarded.unary_unary(grpc_decode.UNDECODABLE, Context())
    assert info.value.args[0] == grpc.StatusCode.INVALID_ARGUMENT and "could not be decoded" in info.value.args[1]
    assert called == []
    ok = guarded.request_deserializer(inference_pb2.PredictRequest(model="m").SerializeToString())
    assert await guarded.unary_unary(ok, Context()) == ok and called == [ok]
