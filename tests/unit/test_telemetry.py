from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from unimodel import __version__
from unimodel.core import otlp, telemetry, tracing
from unimodel.core.telemetry import request_id_var, setup_logging


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_logs_carry_service_instance_and_request_id(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("router", "router-1", "info", "json")
    token = request_id_var.set("req-7")
    try:
        logging.getLogger("unimodel.router").info("picked %s", "w1")
    finally:
        request_id_var.reset(token)
    line = json.loads(capsys.readouterr().err.strip())
    assert line["service"] == "router" and line["instance"] == "router-1"
    assert line["msg"] == "picked w1" and line["request_id"] == "req-7" and line["level"] == "info"


def test_text_logs_are_one_line_with_request_id(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("batcher", "batcher-1", "debug", "text")
    token = request_id_var.set("abc")
    try:
        logging.getLogger("unimodel.batcher").warning("queue full")
    finally:
        request_id_var.reset(token)
    out = capsys.readouterr().err.strip()
    assert out.endswith("WARNING unimodel.batcher: queue full request_id=abc")
    assert "\n" not in out


# tracing: our settings and the standard OTEL_* variables ------------------------------------------------
def setup(exporter: str | None = None, endpoint: str = "", ratio: float | None = None, **env: str) -> telemetry.TraceSetup:
    return telemetry.trace_setup("router", "router-1", exporter, endpoint, ratio, environ=env)


def test_tracing_is_off_unless_an_exporter_is_chosen() -> None:
    s = setup(OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4318")  # an endpoint alone turns nothing on
    assert (s.exporter, s.sample_ratio, s.options) == ("none", 1.0, None)
    assert s.resource == {"service.name": "unimodel-router", "service.instance.id": "router-1",
                          "service.version": __version__, "telemetry.sdk.name": "unimodel", "telemetry.sdk.language": "python"}


@pytest.mark.parametrize(("env", "exporter", "endpoint"), [
    ({"OTEL_TRACES_EXPORTER": "otlp"}, "otlp-http", "http://localhost:4318/v1/traces"),  # the spec's default protocol
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "otlp-grpc", "localhost:4317"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
      "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}, "otlp-http", "http://localhost:4318/v1/traces"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "otlp-http",
     "http://localhost:4318/v1/traces"),  # not supported: warned, protobuf
    ({"OTEL_TRACES_EXPORTER": "zipkin,console"}, "console", None),  # the first one we support
    ({"OTEL_TRACES_EXPORTER": "none"}, "none", None),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": "https://c:4318/base/"}, "otlp-http",
     "https://c:4318/base/v1/traces"),  # the base URL of v1/traces
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": "https://c:4318",
      "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://t:443/custom"}, "otlp-http", "https://t:443/custom"),  # as is
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
      "OTEL_EXPORTER_OTLP_ENDPOINT": "https://c:4317"}, "otlp-grpc", "https://c:4317"),
])
def test_otel_traces_exporter_protocol_and_endpoint(env: dict[str, str], exporter: str, endpoint: str | None) -> None:
    s = setup(**env)
    assert s.exporter == exporter
    assert (s.options.endpoint if s.options else None) == endpoint


def test_our_settings_win_over_the_otel_variables() -> None:
    env = {"OTEL_TRACES_EXPORTER": "console", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4318",
           "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"}
    s = setup("otlp-http", "http://ours:4318", 0.1, **env)
    assert (s.exporter, s.sample_ratio) == ("otlp-http", 0.1)
    assert s.options is not None and s.options.endpoint == "http://ours:4318/v1/traces"
    assert setup("none", **env).exporter == "none"
    grpc = setup("otlp-grpc", "ours:4317", **env)  # the OTEL endpoint fills what ours leaves unset, not this
    assert grpc.options is not None and grpc.options.endpoint == "ours:4317" and grpc.sample_ratio == 0.5
    assert setup("otlp-grpc", **env).options.endpoint == "http://env:4318"  # type: ignore[union-attr, arg-type]  # an otlp exporter has options; env holds OTEL_* variables, never ratio


def test_otel_sdk_disabled_turns_tracing_off_whatever_else_is_set() -> None:
    assert setup("otlp-grpc", "ours:4317", 1.0, OTEL_SDK_DISABLED="TRUE").exporter == "none"
    assert setup("otlp-grpc", OTEL_SDK_DISABLED="false").exporter == "otlp-grpc"


@pytest.mark.parametrize(("sampler", "arg", "exporter", "ratio"), [
    ("", "0.3", "console", 1.0),  # the default sampler, parentbased_always_on, takes no argument
    ("always_on", "", "console", 1.0), ("parentbased_always_on", "", "console", 1.0),
    ("traceidratio", "0.25", "console", 0.25), ("parentbased_traceidratio", "0", "console", 0.0),
    ("parentbased_traceidratio", "", "console", 1.0), ("traceidratio", "1.5", "console", 1.0),
    ("traceidratio", "half", "console", 1.0),  # invalid: warned, the default
    ("parentbased_always_off", "", "console", 0.0),  # no new traces; sampled callers still followed
    ("always_off", "", "none", 0.0),  # no spans at all
    ("jaeger_remote", "", "console", 1.0),  # not supported: warned, the default
])
def test_otel_traces_sampler(sampler: str, arg: str, exporter: str, ratio: float) -> None:
    s = setup("console", OTEL_TRACES_SAMPLER=sampler, OTEL_TRACES_SAMPLER_ARG=arg)
    assert (s.exporter, s.sample_ratio) == (exporter, ratio)


def test_headers_compression_timeout_and_tls_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    s = setup("otlp-grpc", OTEL_EXPORTER_OTLP_HEADERS="a=1,b=x%3Dy%2Cz , junk,c = spaced ",
              OTEL_EXPORTER_OTLP_COMPRESSION="gzip", OTEL_EXPORTER_OTLP_TIMEOUT="2500",
              OTEL_EXPORTER_OTLP_CERTIFICATE=str(ca), OTEL_EXPORTER_OTLP_INSECURE="false")
    assert s.options == otlp.ExportOptions(
        "grpc", "localhost:4317", (("a", "1"), ("b", "x=y,z"), ("c", "spaced")), "gzip", 2.5, str(ca), insecure=False,
    )
    assert "OTEL_EXPORTER_OTLP_HEADERS: ignored 'junk'" in caplog.text
    # the traces-only variables win over the general ones
    s = setup("otlp-http", OTEL_EXPORTER_OTLP_HEADERS="a=1", OTEL_EXPORTER_OTLP_TRACES_HEADERS="t=2",
              OTEL_EXPORTER_OTLP_COMPRESSION="gzip", OTEL_EXPORTER_OTLP_TRACES_COMPRESSION="none",
              OTEL_EXPORTER_OTLP_TIMEOUT="2500", OTEL_EXPORTER_OTLP_TRACES_TIMEOUT="100")
    assert s.options is not None and (s.options.headers, s.options.compression, s.options.timeout_s) == ((("t", "2"),), "none", 0.1)
    s = setup("otlp-http", OTEL_EXPORTER_OTLP_COMPRESSION="brotli", OTEL_EXPORTER_OTLP_TIMEOUT="-1")
    assert s.options is not None and (s.options.compression, s.options.timeout_s) == ("none", 10.0)
    assert "OTEL_EXPORTER_OTLP_COMPRESSION=brotli is not supported" in caplog.text
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY=/nope: no such readable file"):
        setup("otlp-http", OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY="/nope")


def test_service_name_and_resource_attributes() -> None:
    s = setup(OTEL_RESOURCE_ATTRIBUTES="deployment.environment=prod,service.name=from-attrs,service.instance.id=x")
    assert s.resource["service.name"] == "from-attrs" and s.resource["deployment.environment"] == "prod"
    assert s.resource["service.instance.id"] == "router-1"  # ours: the instance id in etcd and the logs
    s = setup(OTEL_SERVICE_NAME="svc", OTEL_RESOURCE_ATTRIBUTES="service.name=from-attrs")
    assert s.resource["service.name"] == "svc"


def test_setup_tracing_runs_on_without_tracing_when_a_file_is_missing(caplog: pytest.LogCaptureFixture) -> None:
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_CERTIFICATE": "/nope.pem"}
    assert telemetry.setup_tracing("router", "r", environ=env) is None and not tracing.enabled()
    assert "tracing is off: OTEL_EXPORTER_OTLP_CERTIFICATE=/nope.pem: no such readable file" in caplog.text


def test_setup_tracing_with_the_console_exporter(capsys: pytest.CaptureFixture[str]) -> None:
    exporter = telemetry.setup_tracing("router", "r", environ={"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "s"})
    assert exporter is not None and tracing.enabled()
    try:
        tracing.finish(tracing.start("hello", root=True))
    finally:
        tracing.disable()
        exporter.shutdown()
    line = json.loads(capsys.readouterr().out)
    assert (line["service"], line["name"]) == ("s", "hello")
