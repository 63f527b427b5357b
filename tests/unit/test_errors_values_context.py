from __future__ import annotations

import grpc
import pytest

from unimodel.core import errors
from unimodel.core.context import RequestContext, now_ms
from unimodel.core.subjects import Header
from unimodel.core.values import from_value, to_value


@pytest.mark.parametrize(
    ("cls", "http", "status"),
    [
        (errors.InvalidArgument, 400, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFound, 404, grpc.StatusCode.NOT_FOUND),
        (errors.ResourceExhausted, 429, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.PayloadTooLarge, 413, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.UnsupportedMediaType, 415, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.Unavailable, 503, grpc.StatusCode.UNAVAILABLE),
        (errors.DeadlineExceeded, 504, grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.Internal, 500, grpc.StatusCode.INTERNAL),
    ],
)
def test_error_mapping(cls: type[errors.UnimodelError], http: int, status: grpc.StatusCode) -> None:
    err = cls("boom", model="m")
    assert err.http_status == http
    assert err.grpc_status == status
    assert err.to_json() == {"error": {"code": err.code_name, "message": "boom", "details": {"model": "m"}}}
    back = errors.from_proto(err.to_proto())
    assert type(back) is cls and back.message == "boom" and back.metadata == {"model": "m"}
    assert type(errors.from_code(err.code_name, "x")) is cls


def test_unknown_errors_become_generic_internal() -> None:
    err = errors.ensure_unimodel_error(KeyError("secret detail"))
    assert isinstance(err, errors.Internal)
    assert "secret" not in err.message
    assert isinstance(errors.from_code("NO_SUCH_CODE", "x"), errors.Internal)


@pytest.mark.parametrize(
    "value", [None, True, 0, -3, 2.5, "text", [1, [2, "x"], {}], {"a": {"b": [None, 1e300]}}, 2**60]
)
def test_values_round_trip(value: object) -> None:
    out = from_value(to_value(value))
    assert out == value
    assert type(out) is type(value) or isinstance(value, int) and value >= 2**53


def test_values_reject_non_json() -> None:
    with pytest.raises(errors.InvalidArgument):
        to_value({1: "a"})
    with pytest.raises(errors.InvalidArgument):
        to_value(object())
    deep: list[object] = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(errors.InvalidArgument, match="deeper"):
        to_value(deep)


def test_context_headers_round_trip_and_deadline() -> None:
    ctx = RequestContext.new(5.0, request_id="r1", traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01")
    headers = ctx.to_headers()
    assert headers[Header.REQUEST_ID] == "r1"
    back = RequestContext.from_headers(headers, 30)
    assert back == ctx
    assert 4.0 < back.remaining_s() <= 5.0
    expired = RequestContext("r2", now_ms() - 1)
    with pytest.raises(errors.DeadlineExceeded):
        expired.check()
    fresh = RequestContext.from_headers({}, 2.0)
    assert fresh.request_id and 1.0 < fresh.remaining_s() <= 2.0


def test_trace_headers_carry_tracestate_only_with_a_traceparent() -> None:
    assert RequestContext("r", 0, "", "vendor=x").trace_headers() == {}
    full = RequestContext("r", 0, "00-" + "a" * 32 + "-" + "b" * 16 + "-01", "vendor=x")
    assert full.trace_headers() == {Header.TRACEPARENT: full.traceparent, Header.TRACESTATE: "vendor=x"}
    assert RequestContext.from_headers(full.to_headers(), 1.0).tracestate == "vendor=x"
