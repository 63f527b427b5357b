"""Jaeger stand-in for tests: OTLP/gRPC receiver on 4317 (tests/helpers/otlp_receiver.py's TraceService, which
keeps every span) and, on 16686, the part of Jaeger's query API (/api/...) that tests ask, in Jaeger's JSON shape:

  GET /api/services                                 {"data": [service names seen], "total": n, ...}
  GET /api/services/SERVICE/operations              {"data": [span names of that service], ...}  (Jaeger: /operations)
  GET /api/traces?service=S[&operation=O][&limit=N] {"data": [trace, ...]}: the traces with a span of S (and O),
                                                    newest first, each with all its spans (every service's)
  GET /api/traces/TRACE_ID                          {"data": [trace]} or 404
  a trace: {"traceID", "spans": [{"traceID", "spanID", "operationName", "references", "startTime", "duration",
            "tags", "processID"}], "processes": {"p1": {"serviceName", "tags"}}, "warnings": null}

plus 200 on GET / of 14269 (Jaeger's admin port, what the compose healthcheck asks). No OTLP/HTTP (4318), no
UI; in memory, at most MEMORY_MAX_TRACES traces (as Jaeger's memory storage): a test's trace store."""

from __future__ import annotations

import json
import os
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

# run as a script, its folder is on sys.path: otlp_receiver.py is copied beside it (tests/containers/standins/Dockerfile)
from otlp_receiver import Span, _Receiver, _TraceService


def _tag(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"key": key, "type": "bool", "value": value}
    if isinstance(value, int):
        return {"key": key, "type": "int64", "value": value}
    if isinstance(value, float):
        return {"key": key, "type": "float64", "value": value}
    if isinstance(value, str):
        return {"key": key, "type": "string", "value": value}
    return {"key": key, "type": "string", "value": json.dumps(value)}


def trace_json(trace_id: str, spans: list[Span]) -> dict[str, Any]:
    processes: dict[str, dict[str, Any]] = {}
    pid_of: dict[str, str] = {}
    out = []
    for s in sorted(spans, key=lambda s: s.start_ns):
        pid = pid_of.get(s.service)
        if pid is None:
            pid = pid_of[s.service] = f"p{len(pid_of) + 1}"
            processes[pid] = {"serviceName": s.service,
                              "tags": [_tag(k, v) for k, v in s.resource.items() if k != "service.name"]}
        refs = [{"refType": "CHILD_OF", "traceID": s.trace_id, "spanID": s.parent_id}] if s.parent_id else []
        refs += [{"refType": "FOLLOWS_FROM", "traceID": t, "spanID": sp} for t, sp in s.links]
        tags = [_tag(k, v) for k, v in s.attributes.items()]
        tags.append(_tag("span.kind", {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}.get(s.kind, "unspecified")))
        if s.status == 2:
            tags.append(_tag("error", True))
        out.append({
            "traceID": s.trace_id, "spanID": s.span_id, "operationName": s.name, "references": refs,
            "startTime": s.start_ns // 1000, "duration": max(0, s.end_ns - s.start_ns) // 1000, "tags": tags,
            "logs": [], "processID": pid, "warnings": None,
        })
    return {"traceID": trace_id, "spans": out, "processes": processes, "warnings": None}


class Store(_Receiver):
    """The receiver's spans, at most `max_traces` traces (Jaeger's MEMORY_MAX_TRACES: the oldest go first)."""

    def __init__(self, max_traces: int) -> None:
        super().__init__()
        self.max_traces = max_traces
        self._order: dict[str, None] = {}  # trace ids, oldest first

    def _take(self, received: Any, spans: list[Span]) -> None:
        super()._take(received, spans)
        with self._lock:
            del self.requests[:-1000]  # the receiver's log of requests: only the last ones
            for s in spans:
                self._order.setdefault(s.trace_id, None)
            if len(self._order) > self.max_traces:
                drop = set(list(self._order)[: len(self._order) - self.max_traces])
                for t in drop:
                    del self._order[t]
                self.spans[:] = [s for s in self.spans if s.trace_id not in drop]

    def snapshot(self) -> list[Span]:
        with self._lock:
            return list(self.spans)

    def services(self) -> list[str]:
        return sorted({s.service for s in self.snapshot()})

    def operations(self, service: str) -> list[str]:
        return sorted({s.name for s in self.snapshot() if s.service == service})

    def traces(self, service: str, operation: str | None, limit: int) -> list[dict[str, Any]]:
        spans = self.snapshot()
        by_trace: dict[str, list[Span]] = {}
        for s in spans:
            by_trace.setdefault(s.trace_id, []).append(s)
        hits = [t for t, ss in by_trace.items()
                if any(s.service == service and (operation is None or s.name == operation) for s in ss)]
        hits.sort(key=lambda t: max(s.start_ns for s in by_trace[t]), reverse=True)
        return [trace_json(t, by_trace[t]) for t in hits[:limit]]


def _envelope(data: list[Any]) -> dict[str, Any]:
    return {"data": data, "total": len(data), "limit": 0, "offset": 0, "errors": None}


def query_server(store: Store, address: tuple[str, int]) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # http.server's name for it
            url = urlparse(self.path)
            query = parse_qs(url.query)
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            if parts == ["api", "services"]:
                return self._json(200, _envelope(store.services()))
            if len(parts) == 4 and parts[:2] == ["api", "services"] and parts[3] == "operations":
                return self._json(200, _envelope(store.operations(parts[2])))
            if parts == ["api", "traces"]:
                service = query.get("service", [""])[0]
                if not service:
                    return self._json(400, {"data": None, "errors": [{"code": 400, "msg": "parameter 'service' is required"}]})
                limit = int(query.get("limit", ["20"])[0] or 20)
                return self._json(200, _envelope(store.traces(service, query.get("operation", [None])[0], limit)))
            if len(parts) == 3 and parts[:2] == ["api", "traces"]:
                spans = store.trace(parts[2].lower())
                if not spans:
                    return self._json(404, {"data": None, "errors": [{"code": 404, "msg": "trace not found"}]})
                return self._json(200, _envelope([trace_json(parts[2].lower(), spans)]))
            if url.path in ("/", "/health"):
                return self._json(200, {"status": "Server available"})
            return self._json(404, {"data": None, "errors": [{"code": 404, "msg": "not found"}]})

        def _json(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(address, Handler)
    server.daemon_threads = True
    return server


def main() -> None:
    host = os.environ.get("STANDIN_BIND", "0.0.0.0")
    store = Store(int(os.environ.get("MEMORY_MAX_TRACES", "100000")))
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(store), grpc_server)
    grpc_server.add_insecure_port(f"{host}:{int(os.environ.get('STANDIN_OTLP_GRPC_PORT', '4317'))}")
    grpc_server.start()
    servers = [query_server(store, (host, int(os.environ.get("STANDIN_QUERY_PORT", "16686")))),
               query_server(store, (host, int(os.environ.get("STANDIN_ADMIN_PORT", "14269"))))]
    for s in servers[1:]:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print(f"jaeger-standin: OTLP/gRPC on {host}:4317, query API on {host}:16686, admin on {host}:14269", flush=True)
    try:
        servers[0].serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        grpc_server.stop(0)


if __name__ == "__main__":
    main()
