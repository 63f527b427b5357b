"""OTLP trace receivers for tests, speaking the real collector protocols: OTLP/gRPC (opentelemetry-proto's
TraceService) and OTLP/HTTP (protobuf bodies, gzip), either with TLS. Each keeps every span it is sent,
flattened, with its service's name, and every request's headers; `answers` scripts failures (served
first, one per request) before the requests that succeed."""

from __future__ import annotations

import gzip
import ssl
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
from google.rpc import status_pb2
from grpc_status import rpc_status
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2


def _value(v: common_pb2.AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which) if which else None


@dataclass
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind: 1 internal, 2 server, 3 client, 4 producer, 5 consumer
    start_ns: int
    end_ns: int
    status: int  # 0 unset, 1 ok, 2 error
    attributes: dict[str, Any] = field(default_factory=dict)
    links: list[tuple[str, str]] = field(default_factory=list)  # (trace id, span id)
    resource: dict[str, Any] = field(default_factory=dict)


def spans_of(request: trace_service_pb2.ExportTraceServiceRequest) -> list[Span]:
    spans = []
    for rs in request.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                spans.append(Span(
                    service=str(resource.get("service.name", "")), name=s.name, trace_id=s.trace_id.hex(),
                    span_id=s.span_id.hex(), parent_id=s.parent_span_id.hex(), kind=s.kind,
                    start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano, status=s.status.code,
                    attributes={kv.key: _value(kv.value) for kv in s.attributes},
                    links=[(link.trace_id.hex(), link.span_id.hex()) for link in s.links], resource=resource,
                ))
    return spans


@dataclass
class Received:
    """One export request as the receiver saw it."""

    at: float  # time.monotonic()
    headers: dict[str, str]  # lower-case names (HTTP headers, gRPC metadata)
    body_bytes: int  # as sent (compressed, for a gzip body)
    answer: int  # HTTP status, or gRPC status code number (0: OK)
    services: frozenset[str] = frozenset()  # the service.name of the spans it carried


@dataclass
class Tls:
    """A self-signed certificate for 127.0.0.1 and localhost, made with openssl (`Tls.make(folder)`)."""

    cert: Path
    key: Path

    @classmethod
    def make(cls, folder: Path) -> Tls:
        cert, key = folder / "cert.pem", folder / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
            check=True, capture_output=True,
        )
        return cls(cert, key)


class _Receiver:
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.requests: list[Received] = []
        self.answers: deque[Any] = deque()
        """Failures to answer first, in order: OTLP/HTTP (status, headers); OTLP/gRPC a google.rpc Status."""
        self._lock = threading.Lock()

    def _take(self, received: Received, spans: list[Span]) -> None:
        received.services = frozenset(s.service for s in spans)
        with self._lock:
            self.requests.append(received)
            if not received.answer:
                self.spans.extend(spans)

    def _next_answer(self) -> Any:
        with self._lock:
            return self.answers.popleft() if self.answers else None

    def trace(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait_trace(self, trace_id: str, done: Callable[[list[Span]], bool], timeout_s: float = 20.0) -> list[Span]:
        """The trace's spans once `done(spans)` holds (services export in batches, a little later)."""
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.trace(trace_id)
            if done(spans):
                return spans
            if time.monotonic() > deadline:
                names = sorted(f"{s.service}: {s.name}" for s in spans)
                raise AssertionError(f"trace {trace_id} incomplete after {timeout_s}s; got {names}")
            time.sleep(0.1)


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    def Export(self, request, context):  # noqa: N802  (gRPC method names are CamelCase)
        answer: status_pb2.Status | None = self.receiver._next_answer()
        self.receiver._take(
            Received(time.monotonic(), dict(context.invocation_metadata()), request.ByteSize(), answer.code if answer else 0),
            spans_of(request),
        )
        if answer is not None:
            context.abort_with_status(rpc_status.to_status(answer))
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver(_Receiver):
    """OTLP/gRPC, plaintext or (with `tls`) TLS."""

    def __init__(self, tls: Tls | None = None) -> None:
        super().__init__()
        self.tls = tls
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._server)
        if tls is None:
            self.port = self._server.add_insecure_port("127.0.0.1:0")
        else:
            credentials = grpc.ssl_server_credentials([(tls.key.read_bytes(), tls.cert.read_bytes())])
            self.port = self._server.add_secure_port("127.0.0.1:0", credentials)

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(0)


class OtlpHttpReceiver(_Receiver):
    """OTLP/HTTP with protobuf bodies at /v1/traces (gzip ones too), plaintext or (with `tls`) TLS."""

    def __init__(self, tls: Tls | None = None) -> None:
        super().__init__()
        self.tls = tls
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # http.server's name for it
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                if self.path != "/v1/traces" or headers.get("content-type") != "application/x-protobuf":
                    return self._answer(404 if self.path != "/v1/traces" else 415, {}, headers, len(body), [])
                data = gzip.decompress(body) if headers.get("content-encoding") == "gzip" else body
                spans = spans_of(trace_service_pb2.ExportTraceServiceRequest.FromString(data))
                status, extra = receiver._next_answer() or (200, {})
                self._answer(status, extra, headers, len(body), spans)

            def _answer(self, status: int, extra: dict[str, str], headers: dict[str, str], size: int, spans: list[Span]) -> None:
                receiver._take(Received(time.monotonic(), headers, size, 0 if status == 200 else status), spans)
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(status)
                for key, value in {"content-type": "application/x-protobuf", **extra}.items():
                    self.send_header(key, value)
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(tls.cert, tls.key)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-http-receiver", daemon=True)

    @property
    def endpoint(self) -> str:
        """The base URL (OTEL_EXPORTER_OTLP_ENDPOINT's kind: the exporter adds /v1/traces)."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> OtlpHttpReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
