"""Span export over OTLP (gRPC or HTTP/protobuf), or to the console: a background thread sends what the
services' tracer recorded, in batches.

Why not the OpenTelemetry SDK's span processor and OTLP exporters: on this project's hot path they cost
about 80 µs of CPU per span (26 µs to make and end it, 46 µs to encode it; scripts/bench/tracing.py
measures both), which is 10-20% of a whole request at the batching benchmark's rates. Here a span is a
slotted object and the protobuf is written directly (the OTLP schema's field numbers, checked against
opentelemetry-proto's generated classes in tests/unit/test_tracing.py): a few µs each. Handing our spans
to the SDK's exporters only for sending would bring the 46 µs back: their public `export()` takes SDK
`ReadableSpan`s and encodes them with the generated classes, in this process, under the GIL the event
loop needs; only their private HTTP client takes bytes. So the sending is ours too, on libraries the
services already use: httpx (TLS, HTTP/1.1) and grpcio (TLS, metadata, compression).

What it does, as the OTLP exporter specification asks (telemetry.trace_setup reads the OTEL_EXPORTER_OTLP_*
variables into ExportOptions): TLS for https:// endpoints, with a custom CA (and client certificate) file;
headers (gRPC metadata); gzip; a timeout per export. A failure the spec calls transient (HTTP 429, 502,
503, 504 and connection errors; gRPC UNAVAILABLE, CANCELLED, DEADLINE_EXCEEDED, ABORTED, OUT_OF_RANGE,
DATA_LOSS, and RESOURCE_EXHAUSTED with RetryInfo) is retried after the receiver's Retry-After / RetryInfo
delay or an exponential backoff with jitter (1 s, 2 s, 4 s, ...), at most MAX_ATTEMPTS tries and never
past the export's timeout; shutdown cuts the waiting short.

Batching follows the SDK's BatchSpanProcessor and its environment variables: a batch goes out every
OTEL_BSP_SCHEDULE_DELAY ms (default 1000) or when OTEL_BSP_MAX_EXPORT_BATCH_SIZE spans (512) are waiting;
at most OTEL_BSP_MAX_QUEUE_SIZE (2048) wait, newer ones are dropped and counted. `shutdown()` sends the
rest. A batch that cannot be sent is dropped and counted, and the drops are logged (at most one line a
minute): tracing never holds up or breaks a request, and a collector that is down costs the services
nothing but the export thread's tries.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import gzip
import logging
import math
import os
import random
import ssl
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from unimodel import __version__
from unimodel.core import protowire
from unimodel.core.tracing import Span

log = logging.getLogger("unimodel.otlp")

GRPC_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
HTTP_PATH = "/v1/traces"
DEFAULT_GRPC = "localhost:4317"
DEFAULT_HTTP = "http://localhost:4318" + HTTP_PATH


# --- protobuf wire format ---------------------------------------------------------------------------
_varint = protowire.varint  # the one base-128 varint helper (value_arrays uses it too)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


_PACK_D = struct.Struct("<d").pack


def _any_value(v: Any) -> bytes:
    """opentelemetry.proto.common.v1.AnyValue."""
    t = type(v)
    if t is str:
        b: bytes = v.encode()
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

_CACHE_MAX = 4096
_KV_CACHE: dict[tuple[str, str | int], bytes] = {}
"""Encoded KeyValue bodies of text and integer attributes (model, instance, route, batch size: the same few
values span after span); cleared when it holds _CACHE_MAX, so values that do not repeat cost nothing but
their own encoding. Keys whose values never repeat (UNIQUE_KEYS) are not kept."""
UNIQUE_KEYS = frozenset({
    "unimodel.request_id", "unimodel.client_request_id", "unimodel.batch.id", "gen_ai.response.id",
})


def _key_value(key: str, value: Any) -> bytes:
    """KeyValue {key = 1, value = 2}, its body."""
    k = _KEYS.get(key)
    if k is None:
        b = key.encode()
        k = _KEYS[key] = b"\x0a" + _varint(len(b)) + b
    if type(value) is str and len(value) < 0x7E:  # short text (ids, names): value and its AnyValue fit one-byte lengths
        b = value.encode()
        n = len(b)
        if n < 0x7E:
            return k + _STR_HEAD[n] + b
    v = _any_value(value)
    n = len(v)
    return k + (b"\x12" + bytes((n,)) if n < 0x80 else b"\x12" + _varint(n)) + v


_STR_HEAD = [bytes((0x12, n + 2, 0x0A, n)) for n in range(0x7E)]
"""KeyValue.value = 2 {AnyValue.string_value = 1} headers of a text of n < 0x7E bytes (both lengths one byte)."""


def _key_values(attributes: Mapping[str, Any], number: int) -> bytes:
    """repeated KeyValue {key = 1, value = 2} as field `number` (its tag fits one byte: number < 16)."""
    tag = bytes((number << 3 | 2,))
    out = []
    cache = _KV_CACHE
    for key, value in attributes.items():
        t = type(value)
        if (t is str or t is int) and key not in UNIQUE_KEYS:
            # text and int only: no bool or float is ever looked up or kept (True == 1 == 1.0 as dict keys)
            cached = cache.get((key, value))
            if cached is None:
                body = _key_value(key, value)
                n = len(body)
                cached = tag + (bytes((n,)) if n < 0x80 else _varint(n)) + body
                if number == 9:  # span attributes only (the resource is encoded once)
                    if len(cache) >= _CACHE_MAX:
                        cache.clear()
                    cache[(key, value)] = cached
            out.append(cached)
            continue
        body = _key_value(key, value)
        n = len(body)
        out.append(tag + (bytes((n,)) if n < 0x80 else _varint(n)) + body)
    return b"".join(out)


_NAMES: dict[tuple[str, int], bytes] = {}
"""Encoded name and kind fields of the span names seen (a small set: tracing.Name), cleared at _CACHE_MAX."""
_TIMES = struct.Struct("<BQBQ").pack
_LINK_SAMPLED, _LINK_UNSAMPLED = b"\x35\x01\x00\x00\x00", b"\x35\x00\x00\x00\x00"


def encode_span(span: Span) -> bytes:
    """opentelemetry.proto.trace.v1.Span."""
    key = (span.name, span.kind)
    name_kind = _NAMES.get(key)
    if name_kind is None:
        name = span.name.encode()
        name_kind = b"\x2a" + _varint(len(name)) + name + b"\x30" + _varint(span.kind)  # name = 5, kind = 6
        if len(_NAMES) >= _CACHE_MAX:
            _NAMES.clear()
        _NAMES[key] = name_kind
    parts = [
        b"\x0a\x10" + span.trace_id.to_bytes(16, "big") + b"\x12\x08" + span.span_id.to_bytes(8, "big"),  # trace_id = 1, span_id = 2
    ]
    if span.parent_id:
        parts.append(b"\x22\x08" + span.parent_id.to_bytes(8, "big"))  # parent_span_id = 4
    parts.append(name_kind)
    parts.append(_TIMES(0x39, span.start_ns, 0x41, span.end_ns))  # start/end_time_unix_nano = 7, 8 (fixed64)
    if span.attributes:
        parts.append(_key_values(span.attributes, 9))  # attributes = 9
    for link in span.links:  # links = 13 (33 bytes): {trace_id = 1, span_id = 2, flags = 6 (fixed32)}
        parts.append(
            b"\x6a\x21\x0a\x10" + link.trace_id.to_bytes(16, "big") + b"\x12\x08" + link.span_id.to_bytes(8, "big")
            + (_LINK_SAMPLED if link.sampled else _LINK_UNSAMPLED)
        )
    if span.status:  # status = 15: {message = 2, code = 3}
        message = span.message.encode()
        status = (_field(2, message) if message else b"") + b"\x18" + _varint(span.status)
        parts.append(_field(15, status))
    parts.append(b"\x85\x01\x01\x00\x00\x00")  # flags = 16 (fixed32): the W3C trace flags, sampled
    return b"".join(parts)


def encoded_span(span: Span) -> bytes:
    """The span as ScopeSpans.spans (field 2) carries it."""
    body = encode_span(span)
    n = len(body)
    return (b"\x12" + _varint(n) if n >= 0x80 else _SPAN_HEAD[n]) + body


_SPAN_HEAD = [bytes((0x12, n)) for n in range(0x80)]
"""ScopeSpans.spans = 2 headers of a span of n < 0x80 bytes."""


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
@dataclass(frozen=True)
class ExportOptions:
    """Where and how OTLP requests go: our settings and the OTEL_EXPORTER_OTLP_* variables, resolved
    (telemetry.trace_setup)."""

    protocol: Literal["grpc", "http"] = "grpc"
    endpoint: str = DEFAULT_GRPC
    """gRPC: [http:// | https://]host:port; HTTP: the whole URL (…/v1/traces). https means TLS."""
    headers: tuple[tuple[str, str], ...] = ()
    compression: Literal["none", "gzip"] = "none"
    timeout_s: float = 10.0
    """One export, its retries included."""
    certificate: str = ""
    """PEM file of the CAs that TLS trusts ("": the system's)."""
    client_key: str = ""
    client_certificate: str = ""
    insecure: bool | None = None
    """A gRPC endpoint without a scheme: False uses TLS; True or None (not set) plaintext."""


class ExportError(Exception):
    """An export that failed: whether the OTLP spec lets it be retried, and after how long the receiver
    asked (HTTP Retry-After, gRPC RetryInfo)."""

    def __init__(self, message: str, retryable: bool, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retryable, self.retry_after_s = retryable, retry_after_s


RETRYABLE_HTTP = frozenset({429, 502, 503, 504})
"""OTLP/HTTP: the statuses a client retries (and connection errors); any other failure is final."""


def retry_after_s(value: str | None) -> float | None:
    """An HTTP Retry-After (seconds or an HTTP date) in seconds from now; None if absent or invalid."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


Sender = tuple[Callable[[bytes, float], None], Callable[[], None]]
"""send(request, timeout_s), raising ExportError; close()."""


def grpc_sender(options: ExportOptions) -> Sender:
    """OTLP/gRPC: TLS for https:// (or insecure=False), headers as metadata, gzip as gRPC's own
    compression."""
    import grpc
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    retryable_codes = {  # OTLP/gRPC: transient; RESOURCE_EXHAUSTED only when the server says when to retry
        grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
    }
    scheme, sep, rest = options.endpoint.partition("://")
    target = (rest if sep else options.endpoint).rstrip("/") or DEFAULT_GRPC
    tls = scheme == "https" if sep else options.insecure is False
    compression = grpc.Compression.Gzip if options.compression == "gzip" else None
    if tls:
        credentials = grpc.ssl_channel_credentials(
            _read(options.certificate), _read(options.client_key), _read(options.client_certificate)
        )
        channel = grpc.secure_channel(target, credentials, compression=compression)
    else:
        channel = grpc.insecure_channel(target, compression=compression)
    export = channel.unary_unary(GRPC_METHOD, request_serializer=None, response_deserializer=None)
    metadata = tuple((key.lower(), value) for key, value in options.headers)

    def retry_info_s(error: grpc.RpcError) -> float | None:
        try:
            status = rpc_status.from_call(error)  # a failed unary call is also its grpc.Call
        except ValueError:
            return None
        for detail in status.details if status is not None else ():
            info = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                return float(info.retry_delay.ToTimedelta().total_seconds())
        return None

    def send(data: bytes, timeout_s: float) -> None:
        try:
            export(data, timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()  # the failed call's status
            delay = retry_info_s(exc)
            retryable = code in retryable_codes or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and delay is not None)
            raise ExportError(f"gRPC {code.name} from {target}: {exc.details()}", retryable, delay) from None

    return send, channel.close


def http_sender(options: ExportOptions) -> Sender:
    """OTLP/HTTP (protobuf): TLS for https:// URLs, the headers, a gzip body."""
    import httpx

    url = options.endpoint
    verify: ssl.SSLContext | bool = True
    if url.startswith("https://"):
        verify = ssl.create_default_context(cafile=options.certificate or None)
        if options.client_certificate:
            verify.load_cert_chain(options.client_certificate, options.client_key or None)
    headers = {**dict(options.headers), "content-type": "application/x-protobuf"}
    compress = options.compression == "gzip"
    if compress:
        headers["content-encoding"] = "gzip"
    client = httpx.Client(verify=verify, headers=headers)

    def send(data: bytes, timeout_s: float) -> None:
        try:
            r = client.post(url, content=gzip.compress(data, compresslevel=6) if compress else data, timeout=timeout_s)
        except httpx.TransportError as exc:  # connection refused or reset, TLS, timeouts: retryable
            raise ExportError(f"{type(exc).__name__} at {url}: {exc}", True) from None
        if r.status_code >= 300:
            raise ExportError(
                f"HTTP {r.status_code} from {url}", r.status_code in RETRYABLE_HTTP, retry_after_s(r.headers.get("retry-after"))
            )

    return send, client.close


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


MAX_ATTEMPTS = 5
"""Tries of one batch at most (all within ExportOptions.timeout_s)."""


class SpanExporter:
    """Queue of ended spans, sent in batches by a daemon thread (`add` is what the Tracer calls).

    Spans are encoded on the thread that ended them; the thread only joins and sends the bytes. A thread
    running Python for milliseconds at a time (encoding a batch) takes the GIL whenever the event loop lets
    it go (waiting for I/O, ONNX Runtime), and the loop then waits up to the interpreter's switch interval
    (5 ms) to get it back, a stall of every request in flight (docs/benchmarks.md, "Tracing cost, issue 19":
    p99 went down in every round once the thread stopped encoding). A span ended on an event loop is
    encoded in a callback of that loop (call_soon, one for all the spans ended meanwhile): after what the
    loop had ready, e.g. the flush of the answers just published, so the encoding is not on their way.
    `add` never blocks (deque appends, no lock). `send` gets the batch and the time left, and raises
    ExportError (or anything else: not retried); `close` runs when the thread ends.
    """

    def __init__(
        self, resource: Mapping[str, Any], encode: Callable[[Span], bytes],
        send: Callable[[list[bytes], float], None], *, close: Callable[[], None] | None = None,
        timeout_s: float = 10.0, backoff_s: float = 1.0,
    ) -> None:
        self.resource = dict(resource)
        self._encode = encode
        self._send, self._close = send, close
        self.timeout_s, self.backoff_s = timeout_s, backoff_s
        self.delay_s = _env_int("OTEL_BSP_SCHEDULE_DELAY", 1000) / 1000.0
        self.max_batch = _env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)
        self.max_queue = _env_int("OTEL_BSP_MAX_QUEUE_SIZE", 2048)
        self._queue: deque[bytes] = deque()
        self._ended: deque[Span] = deque()  # ended on an event loop, to be encoded by its callback
        self._encoding_on: asyncio.AbstractEventLoop | None = None  # the loop with that callback pending
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._handled = threading.Condition()
        self._taken = self._done = 0  # spans the thread took from the queue / has sent or dropped
        self.queue_full = 0
        """Spans dropped by `add` (the queue was full): counted on the request path only."""
        self.failed = 0
        """Spans dropped by the thread: their batch could not be sent."""
        self.exported = 0
        self.retries = 0
        self._logged = (0.0, 0)  # when the last warning went out, and `dropped` then
        self._thread = threading.Thread(target=self._run, name="otlp-export", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        return self.queue_full + self.failed

    def add(self, span: Span) -> None:
        if len(self._queue) + len(self._ended) >= self.max_queue:
            self.queue_full += 1
            return
        loop = asyncio._get_running_loop()
        if loop is None:  # a thread without an event loop: encoded at once
            self._enqueue(span)
            return
        self._ended.append(span)  # deque.append is atomic: no lock on the request path
        if self._encoding_on is not loop:
            self._encoding_on = loop
            loop.call_soon(self._encode_ended)

    def _encode_ended(self) -> None:
        """Encode the spans ended so far (a loop's callback; force_flush, shutdown and the export thread
        take what a loop that stopped left)."""
        self._encoding_on = None
        ended = self._ended
        while ended:
            try:
                span = ended.popleft()
            except IndexError:  # another thread took the last one
                break
            self._enqueue(span)

    def _enqueue(self, span: Span) -> None:
        queue = self._queue
        try:
            encoded = self._encode(span)
        except Exception as exc:  # a span that cannot be encoded is dropped and counted, never raised
            self._failed(1, f"encoding: {exc!r}")
            return
        queue.append(encoded)
        if len(queue) == self.max_batch:  # once per batch (Event.set takes a lock)
            self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.delay_s)
            self._wake.clear()
            self._drain()
        self._drain(time.monotonic() + self.timeout_s)  # shutdown: what is left, once each, within the timeout
        if self._close is not None:
            self._close()

    def _drain(self, deadline: float = math.inf) -> None:
        loop = self._encoding_on
        if self._ended and (loop is None or loop.is_closed()):  # left by a loop that ended before its callback ran
            self._encode_ended()
        queue, handled = self._queue, self._handled
        while queue:
            with handled:  # force_flush counts what the thread has taken
                batch = [queue.popleft() for _ in range(min(len(queue), self.max_batch))]
                self._taken += len(batch)
            if time.monotonic() >= deadline:
                self._failed(len(batch), "shutdown: out of time")
            else:
                self._export(batch)
            with handled:
                self._done += len(batch)
                handled.notify_all()
        if self.queue_full:
            self._warn("")

    def force_flush(self, timeout_s: float | None = None) -> bool:
        """Have the spans queued now sent (retries included) and wait until they are sent or dropped;
        False if `timeout_s` passed first."""
        self._encode_ended()
        with self._handled:
            target = self._taken + len(self._queue)
            self._wake.set()
            return self._handled.wait_for(lambda: self._done >= target, timeout_s)

    def _export(self, batch: list[bytes]) -> None:
        """Send one batch; a retryable failure is tried again after the receiver's delay (Retry-After,
        RetryInfo) or an exponential backoff with jitter, while the timeout and MAX_ATTEMPTS allow and the
        exporter is not shutting down. A batch that cannot be sent is dropped and counted."""
        deadline = time.monotonic() + self.timeout_s
        for attempt in range(MAX_ATTEMPTS):
            try:
                self._send(batch, max(deadline - time.monotonic(), 0.001))
            except Exception as exc:  # whatever the transport raises: the batch, never the thread
                why = str(exc)
                if not isinstance(exc, ExportError) or not exc.retryable or attempt + 1 == MAX_ATTEMPTS:
                    break
                delay = exc.retry_after_s
                if delay is None:
                    delay = self.backoff_s * 2**attempt * random.uniform(0.8, 1.2)
                if delay > deadline - time.monotonic():
                    why += f" (a retry in {delay:.1f} s would pass the {self.timeout_s:g} s timeout)"
                    break
                self.retries += 1
                if self._stop.wait(delay):
                    why += " (shutting down)"
                    break
            else:
                self.exported += len(batch)
                return
        self._failed(len(batch), why)

    def _failed(self, n: int, why: str) -> None:
        self.failed += n
        self._warn(why)

    def _warn(self, why: str) -> None:
        """At most one line a minute: what was dropped since the last one, and the last cause."""
        now, dropped = time.monotonic(), self.dropped
        last, before = self._logged
        if dropped > before and (now - last >= 60 or not last):
            self._logged = (now, dropped)
            full = f" ({self.queue_full} in all because the queue of {self.max_queue} was full)" if self.queue_full else ""
            log.warning("dropped %d spans%s%s", dropped - before, full, f"; last export failure: {why}" if why else "")

    def shutdown(self) -> None:
        """Send what is queued (once each, within the timeout) and stop the thread; idempotent."""
        if self._stop.is_set():
            return
        self._encode_ended()
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=self.timeout_s + 1)


def exporter(
    kind: str, resource: Mapping[str, Any], options: ExportOptions | None = None, *, backoff_s: float = 1.0
) -> SpanExporter:
    """The exporter of setting `otel_exporter` (console, otlp-grpc, otlp-http); OTLP goes out as `options`
    say (default: plaintext to the protocol's default endpoint)."""
    if kind == "console":
        out = sys.stdout.buffer

        def to_console(lines: list[bytes], _timeout_s: float) -> None:
            out.write(b"".join(lines))
            out.flush()

        return SpanExporter(resource, lambda span: console_line(resource, span), to_console)
    if options is None:
        options = ExportOptions("grpc", DEFAULT_GRPC) if kind == "otlp-grpc" else ExportOptions("http", DEFAULT_HTTP)
    send, close = grpc_sender(options) if options.protocol == "grpc" else http_sender(options)
    head = request_head(resource)
    return SpanExporter(
        resource, encoded_span, lambda spans, timeout_s: send(request_of(head, spans), timeout_s),
        close=close, timeout_s=options.timeout_s, backoff_s=backoff_s,
    )
