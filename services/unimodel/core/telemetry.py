"""Telemetry hooks: structured logs carrying the request id, a Prometheus registry, span export."""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from unimodel import __version__
from unimodel.core import otlp, tracing

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


class _TextFormatter(logging.Formatter):
    def __init__(self, service: str, instance_id: str) -> None:
        super().__init__()
        self.service, self.instance_id = service, instance_id

    def format(self, record: logging.LogRecord) -> str:
        rid = request_id_var.get()
        ts = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        line = f"{ts} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if rid:
            line += f" request_id={rid}"
        if record.exc_info and record.levelno >= logging.ERROR:
            # A traceback belongs in the service log for operators, never in a client reply.
            line += "\n" + self.formatException(record.exc_info)
        return line


class _JsonFormatter(_TextFormatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "service": self.service,
            "instance": self.instance_id,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid:
            out["request_id"] = rid
        if record.exc_info and record.levelno >= logging.ERROR:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


def setup_logging(service: str, instance_id: str, level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter((_JsonFormatter if fmt == "json" else _TextFormatter)(service, instance_id))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries that log every reconnect attempt or request at INFO drown the service's own lines.
    for noisy in ("nats", "aetcd", "uvicorn.access", "grpc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class Metrics:
    """A service's own Prometheus registry; each service declares its metrics in one module."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):  # CPU, memory, fds, GC
            self.registry.register(collector)
        self._server: Any = None

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on its own port (for services without an HTTP server). Returns the port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return int(server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class ServiceState(Collector):
    """The series every service exports, read when Prometheus scrapes: which instance this is, whether
    its NATS connection and etcd registration are up, and the requests its bus handlers hold."""

    def __init__(
        self, service: str, instance: str, version: str,
        nats_up: Callable[[], bool], etcd_up: Callable[[], bool], inflight: Callable[[], int],
    ) -> None:
        self.labels = [service, instance, version]
        self.nats_up, self.etcd_up, self.inflight = nats_up, etcd_up, inflight

    def _families(self) -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(
                "unimodel_service_info", "Always 1: the service, instance id and version of this process",
                labels=["service", "instance_id", "version"],
            ),
            GaugeMetricFamily("unimodel_nats_connected", "1 while the NATS connection is up"),
            GaugeMetricFamily("unimodel_etcd_connected", "1 while the instance is registered in etcd (lease alive)"),
            GaugeMetricFamily("unimodel_inflight_requests", "Requests the service's NATS handlers are working on"),
        )

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        info, nats_up, etcd_up, inflight = self._families()
        info.add_metric(self.labels, 1)
        nats_up.add_metric([], 1 if self.nats_up() else 0)
        etcd_up.add_metric([], 1 if self.etcd_up() else 0)
        inflight.add_metric([], self.inflight())
        yield from (info, nats_up, etcd_up, inflight)


def setup_tracing(
    service: str, instance_id: str, exporter: str, endpoint: str = "", sample_ratio: float = 1.0
) -> otlp.SpanExporter | None:
    """Start recording spans when an exporter is configured; tracing stays a no-op otherwise.

    Trace context is propagated across hops either way (W3C headers), so traces stay whole when only
    some services export. The exporter's `shutdown()` sends the spans still queued (run_service calls
    it on exit).
    """
    if exporter == "none":
        return None
    resource = {"service.name": f"unimodel-{service}", "service.instance.id": instance_id,
                "service.version": __version__, "telemetry.sdk.name": "unimodel", "telemetry.sdk.language": "python"}
    span_exporter = otlp.exporter(exporter, endpoint, resource)
    tracing.enable(tracing.Tracer(span_exporter.add, sample_ratio))
    return span_exporter
