"""Spans across hops: names and attribute keys in one place, and the few calls every service makes.

Tracing is off unless a service was started with an exporter (`--otel-exporter` or OTEL_TRACES_EXPORTER;
telemetry.setup_tracing calls `enable()`): until then every call here is a check of one flag and returns
None, and requests carry the caller's W3C `traceparent` on unchanged. When it is on, each hop starts its span as a child of the
`traceparent` it received (NATS header, BatchItem.trace_context, gRPC metadata, HTTP header) and sends
the span's own `traceparent` to the next hop, so one request is one trace:

    gateway   POST /v1/models/{model}:predict       (server; the trace id goes back in x-unimodel-trace-id)
      gateway   cache lookup                          (client; chat requests with the cache on)
        cache     cache query -> cache embed, cache search
      batcher   batcher queue                         (one per request: wait, batch size)
      batcher   batcher dispatch                      (one per batch, in its first request's trace; links to all)
        router    router route                        (the worker chosen, attempts)
          worker    worker batch {model}              (one per batch: rows, compute time)
      worker    infer {model} | chat {model}          (one per request; chat spans follow the GenAI conventions)
      gateway   stream {model}                        (token streaming back to the client)

A batch holds requests of many traces; the spans of the batch itself (dispatch, route, worker batch)
belong to its first request's trace and are linked from every request's own spans.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from unimodel.core.context import RequestContext

INTERNAL, SERVER, CLIENT, PRODUCER, CONSUMER = 1, 2, 3, 4, 5
"""Span kinds, as OTLP numbers them (opentelemetry.proto.trace.v1.Span.SpanKind)."""
STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2

TRACE_ID_HEADER = "x-unimodel-trace-id"
"""Response header (HTTP) and initial metadata key (gRPC) with the request's trace id."""


class Name:
    """Span names (the GenAI ones are `{operation} {model}`, as the convention asks)."""

    CACHE_LOOKUP = "cache lookup"
    CACHE_QUERY = "cache query"
    CACHE_INSERT = "cache insert"
    CACHE_EMBED = "cache embed"
    CACHE_SEARCH = "cache search"
    BATCHER_QUEUE = "batcher queue"
    BATCHER_DISPATCH = "batcher dispatch"
    ROUTER_ROUTE = "router route"
    ROUTER_PLACE = "router place"

    @staticmethod
    def worker_batch(model: str) -> str:
        return f"worker batch {model}"

    @staticmethod
    def infer(model: str) -> str:
        return f"infer {model}"

    @staticmethod
    def generation(operation: str, model: str) -> str:
        return f"{operation} {model}"

    @staticmethod
    def stream(model: str) -> str:
        return f"stream {model}"


class Attr:
    """Attribute keys: OpenTelemetry semantic conventions where one exists, `unimodel.*` otherwise."""

    HTTP_METHOD = "http.request.method"
    HTTP_ROUTE = "http.route"
    HTTP_STATUS = "http.response.status_code"
    URL_PATH = "url.path"
    RPC_SYSTEM = "rpc.system"
    RPC_SERVICE = "rpc.service"
    RPC_METHOD = "rpc.method"
    RPC_GRPC_STATUS = "rpc.grpc.status_code"
    MESSAGING_SYSTEM = "messaging.system"
    MESSAGING_DESTINATION = "messaging.destination.name"
    ERROR_TYPE = "error.type"

    REQUEST_ID = "unimodel.request_id"
    CLIENT_REQUEST_ID = "unimodel.client_request_id"  # the client's x-request-id (gateway server spans)
    MODEL = "unimodel.model"
    INSTANCE = "unimodel.instance"
    API = "unimodel.api"
    BATCH_ID = "unimodel.batch.id"
    BATCH_SIZE = "unimodel.batch.size"
    BATCH_ROWS = "unimodel.batch.rows"
    QUEUE_WAIT_MS = "unimodel.queue.wait_ms"
    WORKER_ID = "unimodel.worker.id"
    ROUTE_ATTEMPTS = "unimodel.route.attempts"
    COMPUTE_MS = "unimodel.compute_ms"
    CACHE_OUTCOME = "unimodel.cache.outcome"
    CACHE_SIMILARITY = "unimodel.cache.similarity"
    CACHE_MATCH = "unimodel.cache.match"
    STREAM_CHUNKS = "unimodel.stream.chunks"

    GENAI_OPERATION = "gen_ai.operation.name"
    GENAI_PROVIDER = "gen_ai.provider.name"
    GENAI_REQUEST_MODEL = "gen_ai.request.model"
    GENAI_RESPONSE_MODEL = "gen_ai.response.model"
    GENAI_MAX_TOKENS = "gen_ai.request.max_tokens"
    GENAI_TEMPERATURE = "gen_ai.request.temperature"
    GENAI_TOP_P = "gen_ai.request.top_p"
    GENAI_INPUT_TOKENS = "gen_ai.usage.input_tokens"
    GENAI_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
    GENAI_FINISH_REASONS = "gen_ai.response.finish_reasons"
    GENAI_RESPONSE_ID = "gen_ai.response.id"
    GENAI_TTFT = "gen_ai.server.time_to_first_token"
    GENAI_TIME_PER_TOKEN = "gen_ai.server.time_per_output_token"


PROVIDER = "unimodel"
"""gen_ai.provider.name of our own LLM spans."""


class SpanContext(NamedTuple):
    trace_id: int
    span_id: int
    sampled: bool


class Span:
    """A span being recorded: plain slots, ended spans go to the exporter (core.otlp) as they are."""

    __slots__ = ("name", "trace_id", "span_id", "parent_id", "kind", "start_ns", "end_ns", "attributes", "links",
                 "status", "message", "_sink")

    def __init__(
        self, name: str, trace_id: int, span_id: int, parent_id: int, kind: int, start_ns: int,
        attributes: dict[str, Any], links: list[SpanContext], sink: Callable[[Span], None] | None,
    ) -> None:
        self.name, self.trace_id, self.span_id, self.parent_id, self.kind = name, trace_id, span_id, parent_id, kind
        self.start_ns, self.end_ns = start_ns, 0
        self.attributes, self.links = attributes, links
        self.status, self.message = STATUS_UNSET, ""
        self._sink = sink  # None: not sampled (kept for its ids: the trace goes on unsampled)

    @property
    def recording(self) -> bool:
        return self._sink is not None

    def get_span_context(self) -> SpanContext:
        return SpanContext(self.trace_id, self.span_id, self._sink is not None)

    def set_attribute(self, key: str, value: Any) -> None:
        if self._sink is not None:
            self.attributes[key] = value

    def add_link(self, context: SpanContext) -> None:
        if self._sink is not None:
            self.links.append(context)

    def set_error(self, message: str) -> None:
        self.status, self.message = STATUS_ERROR, message

    def end(self, end_ns: int | None = None) -> None:
        """Record the end (once); a sampled span is handed to the exporter."""
        if self.end_ns:
            return
        self.end_ns = end_ns or time.time_ns()
        if self._sink is not None:
            self._sink(self)


class Tracer:
    """Makes spans: W3C trace context parents, parent-based sampling with a trace-id ratio for new
    traces (as OpenTelemetry's ParentBased(TraceIdRatioBased)), ended spans to `sink`."""

    def __init__(self, sink: Callable[[Span], None], sample_ratio: float = 1.0) -> None:
        self.sink = sink
        self.bound = round(max(0.0, min(1.0, sample_ratio)) * (1 << 64))
        self._bits = random.Random(os.urandom(16)).getrandbits

    def start(
        self, name: str, parent: SpanContext | None, kind: int, attributes: Mapping[str, Any] | None,
        links: Sequence[SpanContext], start_ns: int | None,
    ) -> Span:
        bits = self._bits
        if parent is not None:
            trace_id, parent_id, sampled = parent.trace_id, parent.span_id, parent.sampled
        else:
            trace_id, parent_id = bits(128) or 1, 0
            sampled = (trace_id & 0xFFFFFFFFFFFFFFFF) < self.bound
        return Span(
            name, trace_id, bits(64) or 1, parent_id, kind, start_ns or time.time_ns(),
            _owned(attributes), list(links), self.sink if sampled else None,
        )


def _owned(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    """The span's attributes: a dict the caller passes is kept as it is (every caller builds one per span),
    anything else is copied."""
    if type(attributes) is dict:
        return attributes
    return dict(attributes) if attributes else {}


_tracer: Tracer | None = None


def enable(tracer: Tracer) -> None:
    """Start making spans with `tracer` (telemetry.setup_tracing)."""
    global _tracer
    _tracer = tracer


def disable() -> None:
    global _tracer
    _tracer = None


def enabled() -> bool:
    return _tracer is not None


def parse_traceparent(traceparent: str) -> SpanContext | None:
    """The remote parent a W3C `traceparent` names (version 00), None if it is not a valid one."""
    # 00-<32 hex trace id>-<16 hex span id>-<2 hex flags>
    if len(traceparent) != 55 or traceparent[2] != "-" or traceparent[35] != "-" or traceparent[52] != "-":
        return None
    flags = traceparent[53:55]
    try:
        trace_id, span_id = int(traceparent[3:35], 16), int(traceparent[36:52], 16)
        sampled = flags == "01" or (flags != "00" and bool(int(flags, 16) & 0x01))  # ours: 01 or 00
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, sampled)


def traceparent_of(span: Span) -> str:
    return "00-%032x-%016x-%s" % (span.trace_id, span.span_id, "01" if span._sink is not None else "00")  # noqa: UP031  # %-format: half the time of the f-string's format specs


def trace_id_of(span: Span) -> str:
    return "%032x" % span.trace_id  # noqa: UP031  # as traceparent_of


def start(
    name: str,
    traceparent: str = "",
    kind: int = INTERNAL,
    attributes: Mapping[str, Any] | None = None,
    *,
    links: Sequence[SpanContext] = (),
    start_ns: int | None = None,
    root: bool = False,
) -> Span | None:
    """A new span, child of `traceparent`; None while tracing is off and for a request that is not
    sampled. Without a traceparent a new trace starts only where requests enter (`root`: the gateway's
    server spans, sampled by the ratio); the services behind it record spans only for sampled traces, so
    a request left out by sampling costs them nothing (it carries no trace context past the gateway).
    A dict `attributes` becomes the span's own, not copied: build one per span."""
    tracer = _tracer
    if tracer is None:
        return None
    parent = parse_traceparent(traceparent) if traceparent else None
    if parent is not None:  # the common case behind the gateway: a sampled caller's child, made here directly
        if not parent.sampled:
            return None
        return Span(
            name, parent.trace_id, tracer._bits(64) or 1, parent.span_id, kind, start_ns or time.time_ns(),
            _owned(attributes), list(links) if links else [], tracer.sink,
        )
    if not root:
        return None
    span = tracer.start(name, None, kind, attributes, links, start_ns)
    return span if span._sink is not None else None


def start_in(
    name: str, ctx: RequestContext, kind: int = INTERNAL, attributes: Mapping[str, Any] | None = None
) -> tuple[Span | None, RequestContext]:
    """A span child of the request's trace context, and the context for the next hop (its traceparent)."""
    span = start(name, ctx.traceparent, kind, attributes)
    if span is None:
        return None, ctx
    return span, RequestContext(
        ctx.request_id, ctx.deadline_ms, traceparent_of(span), ctx.tracestate, ctx.tenant, ctx.client_request_id
    )


def finish(span: Span | None, error: BaseException | str | None = None, end_ns: int | None = None) -> None:
    """End `span`; with `error` (an exception or an error code name) its status is ERROR."""
    if span is None:
        return
    if error is not None:
        code = getattr(error, "code_name", None) or (error if isinstance(error, str) else type(error).__name__)
        span.set_attribute(Attr.ERROR_TYPE, code)
        span.set_error(getattr(error, "message", "") or str(code))
    span.end(end_ns)
