"""Spans, sampling, W3C trace context, the OTLP encoding (checked against opentelemetry-proto's own
classes), the exporter's batching, and the gateway's HTTP server spans."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from unimodel.core import otlp, tracing
from unimodel.core.context import RequestContext
from unimodel.gateway.traces import TracingMiddleware, http_route

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def spans() -> Iterator[list[tracing.Span]]:
    ended: list[tracing.Span] = []
    tracing.enable(tracing.Tracer(ended.append, 1.0))
    try:
        yield ended
    finally:
        tracing.disable()


def test_off_by_default_nothing_is_made_and_the_context_goes_on_unchanged() -> None:
    assert not tracing.enabled()
    ctx = RequestContext.new(5, traceparent=PARENT)
    assert tracing.start("x", PARENT) is None
    assert tracing.start_in("x", ctx) == (None, ctx)
    tracing.finish(None, "INTERNAL")  # a no-op


def test_a_child_span_continues_the_callers_trace(spans: list[tracing.Span]) -> None:
    ctx = RequestContext.new(5, request_id="r1", traceparent=PARENT, tracestate="k=v", tenant="t")
    span, child = tracing.start_in("hop", ctx, tracing.SERVER, {"a": 1})
    assert span is not None
    assert span.trace_id == 0x0AF7651916CD43DD8448EB211C80319C and span.parent_id == 0xB7AD6B7169203331
    assert child.traceparent == f"00-0af7651916cd43dd8448eb211c80319c-{span.span_id:016x}-01"
    assert (child.request_id, child.tracestate, child.tenant, child.deadline_ms) == ("r1", "k=v", "t", ctx.deadline_ms)
    assert child.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert spans == []
    tracing.finish(span)
    tracing.finish(span)  # ending twice records once
    assert spans == [span] and span.end_ns >= span.start_ns


def test_without_a_parent_a_new_trace_starts_only_where_requests_enter(spans: list[tracing.Span]) -> None:
    a, b = tracing.start("a", root=True), tracing.start("b", "garbage", root=True)
    assert a is not None and b is not None
    assert a.parent_id == 0 and b.parent_id == 0 and a.trace_id != b.trace_id
    assert len(tracing.trace_id_of(a)) == 32
    # the services behind the gateway never start traces of their own
    assert tracing.start("inner") is None and tracing.start("inner", "garbage") is None


@pytest.mark.parametrize("bad", ["", "00-abc", "00-" + "0" * 32 + "-b7ad6b7169203331-01",
                                 "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
                                 "00-0af7651916cd43dd8448eb211c80319c+b7ad6b7169203331-01",
                                 "00-zzf7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"])
def test_invalid_traceparents_are_ignored(bad: str) -> None:
    assert tracing.parse_traceparent(bad) is None


def test_sampling_new_traces_by_ratio_and_children_by_their_parent() -> None:
    ended: list[tracing.Span] = []
    tracing.enable(tracing.Tracer(ended.append, 0.0))
    try:
        assert tracing.start("root", root=True) is None  # sampled out: no span, nothing to pass on
        unsampled = PARENT[:-2] + "00"
        assert tracing.start("child", unsampled) is None and tracing.start("child", unsampled, root=True) is None
        sampled_parent = tracing.start("kept", PARENT)  # the caller sampled it: kept despite the ratio 0
        assert sampled_parent is not None and sampled_parent.recording
        tracing.finish(sampled_parent)
        assert ended == [sampled_parent]
        tracing.enable(tracing.Tracer(ended.append, 0.5))
        kept = sum(1 for _ in range(4000) if tracing.start("r", root=True) is not None)
        assert 1700 < kept < 2300
    finally:
        tracing.disable()


def test_errors_set_the_status_and_error_type(spans: list[tracing.Span]) -> None:
    from unimodel.core import errors

    a = tracing.start("a", root=True)
    tracing.finish(a, errors.Unavailable("no worker"))
    b = tracing.start("b", root=True)
    tracing.finish(b, ValueError("x"))
    assert (a.status, a.message, a.attributes["error.type"]) == (tracing.STATUS_ERROR, "no worker", "UNAVAILABLE")  # type: ignore[union-attr]  # the spans fixture samples every span: start() returned a Span
    assert b.attributes["error.type"] == "ValueError"  # type: ignore[union-attr]  # the spans fixture samples every span: start() returned a Span


def test_the_otlp_encoding_is_what_opentelemetry_proto_decodes(spans: list[tracing.Span]) -> None:
    link_to = tracing.start("other", root=True)
    assert link_to is not None
    span = tracing.start("batcher queue", PARENT, tracing.CONSUMER, {
        "s": "text é", "i": 7, "neg": -3, "f": 0.25, "b": True, "no": False, "list": ["stop", "length"],
        "long": "x" * 300, "nums": [1, 2],
    }, links=[link_to.get_span_context()], start_ns=1_000)
    assert span is not None
    tracing.finish(span, "DEADLINE_EXCEEDED", end_ns=5_000)
    data = otlp.encode_request({"service.name": "unimodel-batcher", "pid": 42}, [span, span])
    request = trace_service_pb2.ExportTraceServiceRequest.FromString(data)
    (rs,) = request.resource_spans
    assert {kv.key: (kv.value.string_value or kv.value.int_value) for kv in rs.resource.attributes} == {
        "service.name": "unimodel-batcher", "pid": 42,
    }
    (ss,) = rs.scope_spans
    assert ss.scope.name == "unimodel" and len(ss.spans) == 2
    s = ss.spans[0]
    assert s.trace_id.hex() == "0af7651916cd43dd8448eb211c80319c" and s.parent_span_id.hex() == "b7ad6b7169203331"
    assert s.span_id == span.span_id.to_bytes(8, "big") and s.name == "batcher queue"
    assert s.kind == trace_pb2.Span.SPAN_KIND_CONSUMER
    assert (s.start_time_unix_nano, s.end_time_unix_nano) == (1_000, 5_000)
    values = {kv.key: kv.value for kv in s.attributes}
    assert values["s"].string_value == "text é" and values["i"].int_value == 7 and values["neg"].int_value == -3
    assert values["f"].double_value == 0.25 and values["b"].bool_value is True
    assert values["no"].HasField("bool_value") and values["no"].bool_value is False
    assert [v.string_value for v in values["list"].array_value.values] == ["stop", "length"]
    assert [v.int_value for v in values["nums"].array_value.values] == [1, 2]
    assert values["long"].string_value == "x" * 300 and values["error.type"].string_value == "DEADLINE_EXCEEDED"
    (link,) = s.links
    assert link.trace_id == link_to.trace_id.to_bytes(16, "big") and link.span_id == link_to.span_id.to_bytes(8, "big")
    assert s.status.code == trace_pb2.Status.STATUS_CODE_ERROR and s.status.message == "DEADLINE_EXCEEDED"
    assert s.flags & 0xFF == 1
    root = tracing.start("root", root=True)
    tracing.finish(root)
    (r,) = trace_service_pb2.ExportTraceServiceRequest.FromString(otlp.encode_request({}, [root])).resource_spans[0].scope_spans[0].spans  # type: ignore[list-item]  # the spans fixture samples every span: start() returned a Span
    assert r.parent_span_id == b"" and not r.HasField("status") or r.status.code == 0


def test_the_exporter_sends_in_batches_drops_when_full_and_flushes_on_shutdown(
    monkeypatch: pytest.MonkeyPatch, spans: list[tracing.Span]
) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")  # only size and shutdown trigger a send here
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "3")
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "5")
    sent: list[list[str]] = []
    gate = threading.Event()

    def send(batch: list[bytes], timeout_s: float) -> None:
        gate.wait(5)
        sent.append([b.decode() for b in batch])

    exporter = otlp.SpanExporter({"service.name": "t"}, lambda s: s.name.encode(), send)
    made = [tracing.start(f"s{i}", root=True) for i in range(7)]
    for s in made:
        s.end()  # type: ignore[union-attr]  # the spans fixture samples every span: start() returned a Span
        exporter.add(s)  # type: ignore[arg-type]  # the spans fixture samples every span: start() returned a Span
    assert exporter.dropped == exporter.queue_full == 2  # the queue holds 5; the sender is still blocked
    gate.set()
    exporter.shutdown()
    assert [n for batch in sent for n in batch] == [f"s{i}" for i in range(5)]
    assert all(len(batch) <= 3 for batch in sent) and exporter.exported == 5


def test_a_failing_export_drops_its_batch_and_never_raises(caplog: pytest.LogCaptureFixture, spans: list[tracing.Span]) -> None:
    def send(batch: list[bytes], timeout_s: float) -> None:
        raise ConnectionError("collector down")  # not an ExportError: not retried

    exporter = otlp.SpanExporter({}, otlp.encoded_span, send)
    span = tracing.start("x", root=True)
    span.end()  # type: ignore[union-attr]  # the spans fixture samples every span: start() returned a Span
    exporter.add(span)  # type: ignore[arg-type]  # the spans fixture samples every span: start() returned a Span
    assert exporter.force_flush(5)
    exporter.shutdown()
    exporter.shutdown()  # idempotent
    assert (exporter.dropped, exporter.failed, exporter.retries) == (1, 1, 0) and "collector down" in caplog.text


def test_the_console_exporter_writes_json_lines(spans: list[tracing.Span]) -> None:
    import orjson

    span = tracing.start("x", PARENT, attributes={"k": "v"})
    tracing.finish(span)
    line = orjson.loads(otlp.console_line({"service.name": "unimodel-router"}, span))  # type: ignore[arg-type]  # the spans fixture samples every span: start() returned a Span
    assert line["service"] == "unimodel-router" and line["parent_id"] == "b7ad6b7169203331"
    assert line["trace_id"] == "0af7651916cd43dd8448eb211c80319c" and line["attributes"] == {"k": "v"}


# the gateway's HTTP server spans ----------------------------------------------------------------------
def test_http_routes_are_templated() -> None:
    assert http_route("/v1/models/mlp:predict") == ("/v1/models/{model}:predict", "mlp")
    assert http_route("/v2/models/mlp/versions/2/infer") == ("/v2/models/{model}/infer", "mlp")
    assert http_route("/v1/chat/completions") == ("/v1/chat/completions", "")
    assert http_route("/health/ready") is None and http_route("/metrics") is None


def _call(path: str, headers: list[tuple[bytes, bytes]], chunks: int = 1):
    seen: dict[str, object] = {}
    sent: list[dict[str, object]] = []

    async def inner(scope, receive, send):
        seen["headers"] = dict(scope["headers"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for i in range(chunks):
            seen[f"ended_before_{i}"] = bool(spans_ended)
            await send({"type": "http.response.body", "body": b"x", "more_body": i < chunks - 1})

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    spans_ended: list[tracing.Span] = []
    tracing.enable(tracing.Tracer(spans_ended.append, 1.0))
    try:
        scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
        asyncio.run(TracingMiddleware(inner)(scope, receive, send))
    finally:
        tracing.disable()
    return seen, sent, spans_ended


def test_the_http_middleware_makes_the_server_span_and_hands_its_context_to_the_handler() -> None:
    seen, sent, ended = _call("/v1/chat/completions", [(b"traceparent", PARENT.encode()), (b"x-other", b"1")], chunks=3)
    (span,) = ended
    assert span.name == "POST /v1/chat/completions" and span.kind == tracing.SERVER
    assert span.parent_id == 0xB7AD6B7169203331 and span.attributes["http.response.status_code"] == 200
    headers = seen["headers"]
    assert headers[b"traceparent"] == tracing.traceparent_of(span).encode() and headers[b"x-other"] == b"1"
    assert not seen["ended_before_2"]  # a stream's span ends with its last chunk
    start = sent[0]
    assert (b"x-unimodel-trace-id", b"0af7651916cd43dd8448eb211c80319c") in start["headers"]


def test_the_http_middleware_leaves_untraced_routes_alone() -> None:
    seen, sent, ended = _call("/health/ready", [(b"traceparent", PARENT.encode())])
    assert ended == [] and seen["headers"][b"traceparent"] == PARENT.encode()
    assert all(k != b"x-unimodel-trace-id" for k, _ in sent[0]["headers"])


def test_the_http_middleware_passes_unsampled_requests_through() -> None:
    unsampled = PARENT[:-2] + "00"  # the caller decided not to sample
    seen, sent, ended = _call("/v1/chat/completions", [(b"traceparent", unsampled.encode())])
    assert ended == [] and seen["headers"][b"traceparent"] == unsampled.encode()
    assert all(k != b"x-unimodel-trace-id" for k, _ in sent[0]["headers"])


@pytest.mark.parametrize(("value", "seconds"), [
    ("3", 3.0), ("0.5", 0.5), ("-4", 0.0), ("", None), (None, None), ("soon", None), ("nan", None),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # a date in the past: at once
])
def test_retry_after_in_seconds_or_as_an_http_date(value: str | None, seconds: float | None) -> None:
    assert otlp.retry_after_s(value) == seconds


def test_retry_after_as_a_future_http_date() -> None:
    import email.utils
    import time

    wait = otlp.retry_after_s(email.utils.formatdate(time.time() + 30, usegmt=True))
    assert wait is not None and 28 <= wait <= 30


def test_an_export_that_keeps_failing_is_tried_max_attempts_times_then_dropped(spans: list[tracing.Span]) -> None:
    tries: list[float] = []

    def send(batch: list[bytes], timeout_s: float) -> None:
        tries.append(timeout_s)
        raise otlp.ExportError("HTTP 503", retryable=True)

    exporter = otlp.SpanExporter({}, otlp.encoded_span, send, timeout_s=30, backoff_s=0.001)
    span = tracing.start("x", root=True)
    tracing.finish(span)
    exporter.add(span)  # type: ignore[arg-type]  # the spans fixture samples every span: start() returned a Span
    assert exporter.force_flush(5)
    exporter.shutdown()
    assert len(tries) == otlp.MAX_ATTEMPTS and exporter.retries == otlp.MAX_ATTEMPTS - 1 and exporter.failed == 1
    assert all(t <= 30 for t in tries) and tries == sorted(tries, reverse=True)  # each try gets the time left


def test_the_encoding_caches_never_mix_values_up(monkeypatch: pytest.MonkeyPatch, spans: list[tracing.Span]) -> None:
    monkeypatch.setattr(otlp, "_CACHE_MAX", 8)  # cleared often: every path (cached, new, cleared) is taken
    values: list[object] = [1, True, "1", 1.0, 0, False, -1, "mlp", 2**63 - 1, "mlp"]
    made = []
    for i, value in enumerate(values * 3):
        span = tracing.start(f"s{i % 11}", PARENT, tracing.INTERNAL, {"k": value, "unimodel.request_id": f"r{i}", f"n{i % 9}": i})
        assert span is not None
        tracing.finish(span)
        made.append(span)
    decoded = trace_service_pb2.ExportTraceServiceRequest.FromString(otlp.encode_request({}, made))
    for span, s in zip(made, decoded.resource_spans[0].scope_spans[0].spans, strict=True):
        assert s.name == span.name and s.kind == span.kind
        got = {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in s.attributes}
        want = dict(span.attributes)
        assert got == want and [type(v) for v in got.values()] == [type(v) for v in want.values()]


def test_spans_are_encoded_where_they_end_and_one_that_cannot_be_is_dropped(
    caplog: pytest.LogCaptureFixture, spans: list[tracing.Span]
) -> None:
    sent: list[bytes] = []
    ending_thread = threading.get_ident()
    encoded_in: set[int] = set()

    def encode(span: tracing.Span) -> bytes:
        encoded_in.add(threading.get_ident())
        if span.name == "bad":
            raise ValueError("cannot encode")
        return span.name.encode()

    exporter = otlp.SpanExporter({}, encode, lambda batch, _timeout_s: sent.extend(batch))
    for name in ("a", "bad", "b"):
        span = tracing.start(name, root=True)
        assert span is not None
        span.end()
        exporter.add(span)  # never raises
    assert encoded_in == {ending_thread}  # the export thread only sends
    assert exporter.force_flush(5)
    exporter.shutdown()
    assert sent == [b"a", b"b"] and exporter.failed == exporter.dropped == 1 and exporter.exported == 2
    assert "cannot encode" in caplog.text


def test_spans_ended_on_an_event_loop_are_encoded_by_a_later_callback_of_that_loop(spans: list[tracing.Span]) -> None:
    sent: list[bytes] = []
    exporter = otlp.SpanExporter({}, lambda span: span.name.encode(), lambda batch, _timeout_s: sent.extend(batch))

    async def serve() -> list[int]:
        seen = []
        for name in ("a", "b"):
            span = tracing.start(name, root=True)
            assert span is not None
            span.end()
            exporter.add(span)
        seen.append(len(exporter._queue))  # not yet: the answer this request publishes goes out first
        await asyncio.sleep(0)
        seen.append(len(exporter._queue))  # one callback encoded both
        late = tracing.start("late", root=True)
        assert late is not None
        late.end()
        exporter.add(late)
        return seen

    assert asyncio.run(serve()) == [0, 2]
    # "late" ended as its loop did: encoded by the loop's last callbacks or, left over, by force_flush
    assert exporter.force_flush(5)
    exporter.shutdown()
    assert sent == [b"a", b"b", b"late"] and exporter.exported == 3
