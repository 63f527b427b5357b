"""Span export over OTLP (gRPC or HTTP/protobuf), or to the console: a background thread sends what the
services' tracer recorded, in batches.

Why not the OpenTelemetry SDK's span processor and OTLP exporter: on this project's hot path they cost
about 80 µs of CPU per span (26 µs to make and end it, 46 µs to encode it; scripts/bench/tracing.py
measures both), which is 10-20% of a whole request at the batching benchmark's rates. Here a span is a
slotted object and the protobuf is written directly (the OTLP schema's field numbers, checked against
opentelemetry-proto's generated classes in tests/unit/test_tracing.py): a few µs each.

Batching follows the SDK's BatchSpanProcessor and its environment variables: a batch goes out every
OTEL_BSP_SCHEDULE_DELAY ms (default 1000) or when OTEL_BSP_MAX_EXPORT_BATCH_SIZE spans (512) are waiting;
at most OTEL_BSP_MAX_QUEUE_SIZE (2048) wait, newer ones are dropped and counted. `shutdown()` sends the
rest. A failed export is logged (at most one line a minute) and its spans dropped: tracing never holds
up or breaks a request.
"""

from __future__ import annotations

import logging
import os
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from unimodel import __version__
from unimodel.core import protowire
from unimodel.core.tracing import Span

log = logging.getLogger("unimodel.otlp")

GRPC_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
HTTP_PATH = "/v1/traces"
DEFAULT_GRPC = "localhost:4317"
DEFAULT_HTTP = "http://localhost:4318"


# --- protobuf wire format ---------------------------------------------------------------------------
_varint = protowire.varint  # the same base-128 varint as the services' own wire helpers


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


_PACK_Q = struct.Struct("<Q").pack
_PACK_D = struct.Struct("<d").pack


def _any_value(v: Any) -> bytes:
    """opentelemetry.proto.common.v1.AnyValue."""
    t = type(v)
    if t is str:
        b = v.encode()
        n = len(b)
        return (b"\x0a" + bytes((n,)) if n < 0x80 else b"\x0a" + _varint(n)) + b  # string_value = 1
    if t is bool:
        return b"\x10\x01" if v else b"\x10\x00"  # bool_value = 2
    if t is int:
        return b"\x18" + _varint(v & 0xFFFFFFFFFFFFFFFF)  # int_value = 3 (int64, two's complement)
    if t is float:
        return b"\x21" + _PACK_D(v)  # double_value = 4
    if isinstance(v, (list, tuple)):
        return _field(5, b"".join(_field(1, _any_value(x)) for x in v))  # array_value = 5 {values = 1}
    if isinstance(v, bytes):
        return _field(7, v)
    for base in (bool, int, float, str):  # subclasses (enums, numpy scalars are not: they become text)
        if isinstance(v, base):
            return _any_value(base(v))
    return _any_value(str(v))


_KEYS: dict[str, bytes] = {}
"""Encoded attribute keys (field 1 of KeyValue): the keys are a small fixed set (tracing.Attr)."""


def _key_values(attributes: Mapping[str, Any], number: int) -> bytes:
    """repeated KeyValue {key = 1, value = 2} as field `number` (its tag fits one byte: number < 16)."""
    tag = bytes((number << 3 | 2,))
    out = []
    keys = _KEYS
    for key, value in attributes.items():
        k = keys.get(key)
        if k is None:
            b = key.encode()
            k = keys[key] = b"\x0a" + _varint(len(b)) + b
        v = _any_value(value)
        n = len(v)
        body = k + (b"\x12" + bytes((n,)) if n < 0x80 else b"\x12" + _varint(n)) + v
        n = len(body)
        out.append(tag + (bytes((n,)) if n < 0x80 else _varint(n)) + body)
    return b"".join(out)


def encode_span(span: Span) -> bytes:
    """opentelemetry.proto.trace.v1.Span."""
    name = span.name.encode()
    parts = [
        b"\x0a\x10", span.trace_id.to_bytes(16, "big"),  # trace_id = 1
        b"\x12\x08", span.span_id.to_bytes(8, "big"),  # span_id = 2
    ]
    if span.parent_id:
        parts += (b"\x22\x08", span.parent_id.to_bytes(8, "big"))  # parent_span_id = 4
    parts += (
        b"\x2a", _varint(len(name)), name,  # name = 5
        b"\x30", _varint(span.kind),  # kind = 6
        b"\x39", _PACK_Q(span.start_ns),  # start_time_unix_nano = 7 (fixed64)
        b"\x41", _PACK_Q(span.end_ns),  # end_time_unix_nano = 8 (fixed64)
    )
    if span.attributes:
        parts.append(_key_values(span.attributes, 9))  # attributes = 9
    for link in span.links:  # links = 13: {trace_id = 1, span_id = 2, flags = 6 (fixed32)}
        body = b"\x0a\x10" + link.trace_id.to_bytes(16, "big") + b"\x12\x08" + link.span_id.to_bytes(8, "big")
        body += b"\x35" + struct.pack("<I", 1 if link.sampled else 0)
        parts.append(_field(13, body))
    if span.status:  # status = 15: {message = 2, code = 3}
        message = span.message.encode()
        status = (_field(2, message) if message else b"") + b"\x18" + _varint(span.status)
        parts.append(_field(15, status))
    parts.append(b"\x85\x01\x01\x00\x00\x00")  # flags = 16 (fixed32): the W3C trace flags, sampled
    return b"".join(parts)


def encoded_span(span: Span) -> bytes:
    """The span as ScopeSpans.spans (field 2) carries it."""
    return _field(2, encode_span(span))


def request_head(resource: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """The parts of an export request that do not change: the Resource and the InstrumentationScope."""
    scope = _field(1, b"\x0a" + _varint(8) + b"unimodel" + _field(2, __version__.encode()))  # ScopeSpans.scope = 1
    return _field(1, _key_values(resource, 1)), scope  # ResourceSpans.resource = 1


def request_of(head: tuple[bytes, bytes], spans: list[bytes]) -> bytes:
    """opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest with one ResourceSpans, from
    encoded_span() parts."""
    resource, scope = head
    resource_spans = resource + _field(2, scope + b"".join(spans))  # ResourceSpans.scope_spans = 2
    return _field(1, resource_spans)  # resource_spans = 1


def encode_request(resource: Mapping[str, Any], spans: list[Span]) -> bytes:
    return request_of(request_head(resource), [encoded_span(s) for s in spans])


# --- transports --------------------------------------------------------------------------------------
def grpc_sender(endpoint: str, timeout_s: float = 10.0) -> Callable[[bytes], None]:
    import grpc

    target = endpoint.removeprefix("http://").removeprefix("https://").rstrip("/") or DEFAULT_GRPC
    channel = grpc.insecure_channel(target)
    export = channel.unary_unary(GRPC_METHOD, request_serializer=None, response_deserializer=None)

    def send(data: bytes) -> None:
        export(data, timeout=timeout_s)

    return send


def http_sender(endpoint: str, timeout_s: float = 10.0) -> Callable[[bytes], None]:
    import httpx

    url = (endpoint or DEFAULT_HTTP).rstrip("/")
    if not url.endswith(HTTP_PATH):
        url += HTTP_PATH
    client = httpx.Client(timeout=timeout_s)

    def send(data: bytes) -> None:
        r = client.post(url, content=data, headers={"content-type": "application/x-protobuf"})
        if r.status_code >= 300:
            raise RuntimeError(f"HTTP {r.status_code} from {url}")

    return send


def console_line(resource: Mapping[str, Any], span: Span) -> bytes:
    """One span as a JSON line (the console exporter)."""
    return orjson.dumps({
        "service": resource.get("service.name"), "name": span.name, "trace_id": f"{span.trace_id:032x}",
        "span_id": f"{span.span_id:016x}", "parent_id": f"{span.parent_id:016x}" if span.parent_id else "",
        "kind": span.kind, "start_ns": span.start_ns, "duration_ms": (span.end_ns - span.start_ns) / 1e6,
        "status": span.status, "attributes": span.attributes,
        "links": [f"{link.trace_id:032x}-{link.span_id:016x}" for link in span.links],
    }, default=str) + b"\n"


# --- the exporter -------------------------------------------------------------------------------------
def _env_int(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, default)))
    except ValueError:
        return default


class SpanExporter:
    """Queue of ended spans, sent in batches by a daemon thread (`add` is what the Tracer calls).

    `add` only queues the span (a deque append, no lock): the request path pays for making and ending
    its spans, not for encoding them. The thread encodes and sends one batch at a time.
    """

    def __init__(
        self, resource: Mapping[str, Any], encode: Callable[[Span], bytes], send: Callable[[list[bytes]], None]
    ) -> None:
        self.resource = dict(resource)
        self._encode = encode
        self._send = send
        self.delay_s = _env_int("OTEL_BSP_SCHEDULE_DELAY", 1000) / 1000.0
        self.max_batch = _env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)
        self.max_queue = _env_int("OTEL_BSP_MAX_QUEUE_SIZE", 2048)
        self._queue: deque[Span] = deque()
        self._wake = threading.Event()
        self._stopped = False
        self.dropped = 0
        self.exported = 0
        self._last_error_log = 0.0
        self._thread = threading.Thread(target=self._run, name="otlp-export", daemon=True)
        self._thread.start()

    def add(self, span: Span) -> None:
        queue = self._queue
        if len(queue) >= self.max_queue:
            self.dropped += 1
            return
        queue.append(span)  # deque.append is atomic: no lock on the request path
        if len(queue) >= self.max_batch:
            self._wake.set()

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait(self.delay_s)
            self._wake.clear()
            self._drain()

    def _drain(self) -> None:
        queue = self._queue
        while queue:
            # One batch at a time, encoded in this thread: the interpreter's switch interval shares the GIL
            # with the event loop (yielding it more often, e.g. sleep(0) per chunk, costs more in handoffs).
            encode, pop = self._encode, queue.popleft
            batch = [encode(pop()) for _ in range(min(len(queue), self.max_batch))]
            try:
                self._send(batch)
                self.exported += len(batch)
            except Exception as exc:
                self.dropped += len(batch)
                now = time.monotonic()
                if now - self._last_error_log >= 60:
                    self._last_error_log = now
                    log.warning("could not export %d spans (%s); dropped", len(batch), exc)

    def force_flush(self) -> None:
        self._drain()

    def shutdown(self) -> None:
        """Send what is queued and stop the thread."""
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=5)
        self._drain()


def exporter(kind: str, endpoint: str, resource: Mapping[str, Any]) -> SpanExporter:
    """The exporter of setting `otel_exporter` (console, otlp-grpc, otlp-http)."""
    if kind == "console":
        out = sys.stdout.buffer

        def to_console(lines: list[bytes]) -> None:
            out.write(b"".join(lines))
            out.flush()

        return SpanExporter(resource, lambda span: console_line(resource, span), to_console)
    send = grpc_sender(endpoint or DEFAULT_GRPC) if kind == "otlp-grpc" else http_sender(endpoint or DEFAULT_HTTP)
    head = request_head(resource)
    return SpanExporter(resource, encoded_span, lambda spans: send(request_of(head, spans)))
