"""Spans across hops: names and attribute keys in one place, and the few calls every service makes.

Tracing is off unless a service was started with an exporter (`--otel-exporter`, telemetry.setup_tracing
calls `enable()`): then every call here is a check of one flag and returns None, and requests carry the
caller's W3C `traceparent` on unchanged. When it is on, each hop starts its span as a child of the
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

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from unimodel.core.context import RequestContext

SERVER, CLIENT, INTERNAL, PRODUCER, CONSUMER = (
    SpanKind.SERVER, SpanKind.CLIENT, SpanKind.INTERNAL, SpanKind.PRODUCER, SpanKind.CONSUMER
)

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

_tracer: trace.Tracer | None = None


def enable(provider: trace.TracerProvider) -> None:
    """Start making spans with `provider` (telemetry.setup_tracing)."""
    global _tracer
    _tracer = provider.get_tracer("unimodel")


def disable() -> None:
    global _tracer
    _tracer = None


def enabled() -> bool:
    return _tracer is not None


def parent_context(traceparent: str) -> Any:
    """The OTel context whose current span is the remote parent `traceparent` names (None if invalid)."""
    # version 00: 00-<32 hex trace id>-<16 hex span id>-<2 hex flags>
    if len(traceparent) != 55 or traceparent[2] != "-" or traceparent[35] != "-" or traceparent[52] != "-":
        return None
    try:
        trace_id, span_id, flags = int(traceparent[3:35], 16), int(traceparent[36:52], 16), int(traceparent[53:55], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    parent = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags & 0x01))
    return trace.set_span_in_context(NonRecordingSpan(parent))


def traceparent_of(span: Span) -> str:
    sc = span.get_span_context()
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"


def trace_id_of(span: Span) -> str:
    return f"{span.get_span_context().trace_id:032x}"


def link_to(traceparent: str) -> Link | None:
    ctx = parent_context(traceparent)
    return Link(trace.get_current_span(ctx).get_span_context()) if ctx is not None else None


def start(
    name: str,
    traceparent: str = "",
    kind: SpanKind = INTERNAL,
    attributes: Mapping[str, Any] | None = None,
    *,
    links: Sequence[Link] = (),
    start_ns: int | None = None,
) -> Span | None:
    """A new span, child of `traceparent` (a new trace without one); None while tracing is off."""
    tracer = _tracer
    if tracer is None:
        return None
    return tracer.start_span(
        name, parent_context(traceparent) if traceparent else None, kind, attributes, links, start_time=start_ns
    )


def start_in(
    name: str, ctx: RequestContext, kind: SpanKind = INTERNAL, attributes: Mapping[str, Any] | None = None
) -> tuple[Span | None, RequestContext]:
    """A span child of the request's trace context, and the context for the next hop (its traceparent)."""
    span = start(name, ctx.traceparent, kind, attributes)
    if span is None:
        return None, ctx
    return span, dataclasses.replace(ctx, traceparent=traceparent_of(span))


def finish(span: Span | None, error: BaseException | str | None = None, end_ns: int | None = None) -> None:
    """End `span`; with `error` (an exception or an error code name) its status is ERROR."""
    if span is None:
        return
    if error is not None:
        code = getattr(error, "code_name", None) or (error if isinstance(error, str) else type(error).__name__)
        span.set_attribute(Attr.ERROR_TYPE, code)
        span.set_status(Status(StatusCode.ERROR, getattr(error, "message", "") or str(code)))
    span.end(end_ns)
