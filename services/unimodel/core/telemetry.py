"""Telemetry hooks: structured logs carrying the request id, a Prometheus registry, span export (our
settings merged with the standard OTEL_* variables)."""

from __future__ import annotations

import contextvars
import logging
import math
import os
import ssl
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
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


# --- tracing: our settings and the standard OTEL_* variables ------------------------------------------
log = logging.getLogger("unimodel.telemetry")

EXPORTERS = ("none", "console", "otlp-grpc", "otlp-http")


@dataclass(frozen=True)
class TraceSetup:
    """What a service traces with: its exporter (one of EXPORTERS), the share of new traces sampled,
    the resource its spans describe and, for OTLP, where and how they go."""

    exporter: str
    sample_ratio: float
    resource: dict[str, Any]
    options: otlp.ExportOptions | None = None


def _first(environ: Mapping[str, str], *names: str) -> tuple[str, str]:
    """(value, name) of the first of `names` set to something other than blanks; ("", "") if none is."""
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return value, name
    return "", ""


def _pairs(value: str, name: str) -> list[tuple[str, str]]:
    """`key=value,key=value` with percent-encoded values (OTEL_EXPORTER_OTLP_HEADERS, OTEL_RESOURCE_ATTRIBUTES)."""
    out = []
    for item in value.split(","):
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            if item.strip():
                log.warning("%s: ignored %r (not key=value)", name, item.strip())
            continue
        out.append((key.strip(), urllib.parse.unquote(val.strip())))
    return out


def _signal(environ: Mapping[str, str], option: str) -> tuple[str, str]:
    """OTEL_EXPORTER_OTLP_TRACES_<option>, else OTEL_EXPORTER_OTLP_<option>: (value, the variable's name)."""
    return _first(environ, f"OTEL_EXPORTER_OTLP_TRACES_{option}", f"OTEL_EXPORTER_OTLP_{option}")


def _exporter_from_env(environ: Mapping[str, str]) -> str:
    """OTEL_TRACES_EXPORTER (otlp, console, none; the first we support of a list) with
    OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL (grpc, http/protobuf: the spec's default)."""
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    for name in names:
        if name == "none":
            return "none"
        if name == "console":
            return "console"
        if name == "otlp":
            protocol, var = _signal(environ, "PROTOCOL")
            if protocol == "grpc":
                return "otlp-grpc"
            if protocol not in ("", "http/protobuf"):
                log.warning("%s=%s is not supported; using http/protobuf", var, protocol)
            return "otlp-http"
        log.warning("OTEL_TRACES_EXPORTER: %r is not supported (otlp, console, none)", name)
    return "none"


def _sample_ratio_from_env(environ: Mapping[str, str]) -> float | None:
    """OTEL_TRACES_SAMPLER(_ARG) as our sampler's ratio of new traces; None: always_off (no spans at all).
    Our sampler always follows a caller's sampled flag, so always_on and traceidratio act as their
    parentbased_ forms."""
    sampler = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler in ("", "always_on", "parentbased_always_on"):
        return 1.0
    if sampler == "always_off":
        return None
    if sampler == "parentbased_always_off":
        return 0.0
    if sampler in ("traceidratio", "parentbased_traceidratio"):
        arg = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
        try:
            ratio = float(arg) if arg else 1.0
        except ValueError:
            ratio = -1.0
        if 0.0 <= ratio <= 1.0:
            return ratio
        log.warning("OTEL_TRACES_SAMPLER_ARG=%s is not a ratio in [0, 1]; using 1.0", arg)
        return 1.0
    log.warning("OTEL_TRACES_SAMPLER=%s is not supported; using parentbased_always_on", sampler)
    return 1.0


def _endpoint(protocol: str, setting: str, environ: Mapping[str, str]) -> str:
    """Our --otel-endpoint (for HTTP /v1/traces is added unless there), else OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
    (as is), else OTEL_EXPORTER_OTLP_ENDPOINT (for HTTP the base URL of v1/traces), else the default."""
    if protocol == "grpc":
        return setting or _signal(environ, "ENDPOINT")[0] or otlp.DEFAULT_GRPC
    if setting:
        url = setting.rstrip("/")
        return url if url.endswith(otlp.HTTP_PATH) else url + otlp.HTTP_PATH
    traces, _ = _first(environ, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if traces:
        return traces
    base, _ = _first(environ, "OTEL_EXPORTER_OTLP_ENDPOINT")
    return base.rstrip("/") + otlp.HTTP_PATH if base else otlp.DEFAULT_HTTP


def _export_options(protocol: str, endpoint_setting: str, environ: Mapping[str, str]) -> otlp.ExportOptions:
    compression, var = _signal(environ, "COMPRESSION")
    if compression.lower() not in ("", "none", "gzip"):
        log.warning("%s=%s is not supported (gzip, none); sending uncompressed", var, compression)
    timeout, var = _signal(environ, "TIMEOUT")
    try:
        timeout_ms = float(timeout) if timeout else 10_000.0
    except ValueError:
        timeout_ms = 0.0
    if not 0 < timeout_ms < math.inf:
        log.warning("%s=%s is not a positive number of milliseconds; using 10000", var, timeout)
        timeout_ms = 10_000.0
    files = {}
    for option in ("CERTIFICATE", "CLIENT_KEY", "CLIENT_CERTIFICATE"):
        path, var = _signal(environ, option)
        if path and not os.access(path, os.R_OK):
            raise ValueError(f"{var}={path}: no such readable file")
        files[option] = path
    insecure, _ = _signal(environ, "INSECURE")
    headers, var = _signal(environ, "HEADERS")
    return otlp.ExportOptions(
        protocol="grpc" if protocol == "grpc" else "http",
        endpoint=_endpoint(protocol, endpoint_setting, environ),
        headers=tuple(_pairs(headers, var)),
        compression="gzip" if compression.lower() == "gzip" else "none",
        timeout_s=timeout_ms / 1000.0,
        certificate=files["CERTIFICATE"], client_key=files["CLIENT_KEY"], client_certificate=files["CLIENT_CERTIFICATE"],
        insecure={"true": True, "false": False}.get(insecure.lower()),
    )


def trace_setup(
    service: str, instance_id: str, exporter: str | None = None, endpoint: str = "",
    sample_ratio: float | None = None, environ: Mapping[str, str] | None = None,
) -> TraceSetup:
    """Our tracing settings (None / "": not set) merged with the standard OTEL_* variables: a UniModel
    setting that is set wins; the OTEL_* variable fills what it leaves unset; OTEL_SDK_DISABLED=true turns
    tracing off whatever else is set. Raises ValueError for a certificate file that cannot be read."""
    env = os.environ if environ is None else environ
    resource: dict[str, Any] = dict(_pairs(env.get("OTEL_RESOURCE_ATTRIBUTES", ""), "OTEL_RESOURCE_ATTRIBUTES"))
    resource.update({
        "service.name": env.get("OTEL_SERVICE_NAME", "").strip() or resource.get("service.name") or f"unimodel-{service}",
        "service.instance.id": instance_id, "service.version": __version__,
        "telemetry.sdk.name": "unimodel", "telemetry.sdk.language": "python",
    })
    kind = exporter or _exporter_from_env(env)
    ratio = sample_ratio if sample_ratio is not None else _sample_ratio_from_env(env)
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or ratio is None:
        kind, ratio = "none", 0.0
    if kind not in EXPORTERS:
        raise ValueError(f"unknown span exporter {kind!r}")
    options = _export_options(kind.removeprefix("otlp-"), endpoint, env) if kind.startswith("otlp-") else None
    return TraceSetup(kind, ratio, resource, options)


def setup_tracing(
    service: str, instance_id: str, exporter: str | None = None, endpoint: str = "",
    sample_ratio: float | None = None, environ: Mapping[str, str] | None = None,
) -> otlp.SpanExporter | None:
    """Start recording spans when an exporter is configured (trace_setup); tracing stays a no-op otherwise,
    and when the exporter's files cannot be read (logged: tracing is never a reason not to serve).

    Trace context is propagated across hops either way (W3C headers), so traces stay whole when only
    some services export. The exporter's `shutdown()` sends the spans still queued (run_service calls
    it on exit).
    """
    try:
        setup = trace_setup(service, instance_id, exporter, endpoint, sample_ratio, environ)
        if setup.exporter == "none":
            return None
        span_exporter = otlp.exporter(setup.exporter, setup.resource, setup.options)
    except (ValueError, OSError, ssl.SSLError) as exc:
        log.error("tracing is off: %s", exc)
        return None
    tracing.enable(tracing.Tracer(span_exporter.add, setup.sample_ratio))
    return span_exporter
