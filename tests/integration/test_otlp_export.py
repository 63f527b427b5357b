"""Span export against real OTLP receivers on local ports (tests/helpers/otlp_receiver.py): the standard OTEL_*
variables, headers, gzip, TLS with a custom CA, and the bounded retry (HTTP 429/502/503/504 and connection
errors, Retry-After; gRPC UNAVAILABLE and RetryInfo). The export is driven as a service drives it:
telemetry.setup_tracing, spans made with tracing.start, the exporter's shutdown sending what is queued."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from helpers.otlp_receiver import OtlpHttpReceiver, OtlpReceiver, Tls
from unimodel.core import otlp, telemetry, tracing
from unimodel.local.procs import free_port

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def http_receiver() -> Iterator[OtlpHttpReceiver]:
    receiver = OtlpHttpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the test certificate")
    return Tls.make(tmp_path_factory.mktemp("tls"))


def start_exporter(environ: dict[str, str], exporter: str | None = None, endpoint: str = "", *,
                   backoff_s: float = 0.05) -> otlp.SpanExporter:
    """The exporter a service would start with `environ` as its environment and these settings; tracing on."""
    setup = telemetry.trace_setup("router", "router-1", exporter, endpoint, environ=environ)
    assert setup.exporter != "none"
    span_exporter = otlp.exporter(setup.exporter, setup.resource, setup.options, backoff_s=backoff_s)
    tracing.enable(tracing.Tracer(span_exporter.add, setup.sample_ratio))
    return span_exporter


def export(environ: dict[str, str], names: tuple[str, ...] = ("a", "b"), *, exporter: str | None = None,
           endpoint: str = "", backoff_s: float = 0.05) -> otlp.SpanExporter:
    """Trace as a service does (start_exporter): spans `names` (one trace), sent (retries included,
    force_flush), then the exporter's shutdown. Returns the exporter, shut down."""
    span_exporter = start_exporter(environ, exporter, endpoint, backoff_s=backoff_s)
    try:
        parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        for name in names:
            tracing.finish(tracing.start(name, parent))
        assert span_exporter.force_flush(30)
    finally:
        tracing.disable()
        span_exporter.shutdown()
    return span_exporter


def test_otel_variables_choose_the_endpoint_headers_gzip_and_service_name(http_receiver: OtlpHttpReceiver) -> None:
    exp = export({
        "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": http_receiver.endpoint,  # the base URL: /v1/traces is added
        "OTEL_EXPORTER_OTLP_HEADERS": "api-key=secret%20one,x-tenant=t1",
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip", "OTEL_SERVICE_NAME": "my-router",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
    })
    (request,) = http_receiver.requests
    assert request.headers["api-key"] == "secret one" and request.headers["x-tenant"] == "t1"
    assert request.headers["content-encoding"] == "gzip"
    assert [s.name for s in http_receiver.spans] == ["a", "b"]
    resource = http_receiver.spans[0].resource
    assert resource["service.name"] == "my-router" and resource["deployment.environment"] == "test"
    assert resource["service.instance.id"] == "router-1"
    assert (exp.exported, exp.dropped, exp.retries) == (2, 0, 0)


def test_our_endpoint_setting_wins_over_the_otel_variable(http_receiver: OtlpHttpReceiver) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    exp = export({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": nowhere}, ("ours",), exporter="otlp-http",
                 endpoint=http_receiver.endpoint)  # the base URL: /v1/traces is added
    assert [s.name for s in http_receiver.spans] == ["ours"] and (exp.exported, exp.retries) == (1, 0)


def test_a_503_is_retried_after_a_backoff_then_the_batch_goes_through(http_receiver: OtlpHttpReceiver) -> None:
    http_receiver.answers.extend([(503, {}), (502, {})])
    exp = export({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{http_receiver.endpoint}/v1/traces"},
                 backoff_s=0.2)
    first, second, third = http_receiver.requests
    assert [r.answer for r in http_receiver.requests] == [503, 502, 0]
    assert second.at - first.at >= 0.2 * 0.8 and third.at - second.at >= 0.4 * 0.8  # exponential, with jitter
    assert [s.name for s in http_receiver.spans] == ["a", "b"]
    assert (exp.exported, exp.dropped, exp.retries) == (2, 0, 2)


def test_retry_after_is_honoured(http_receiver: OtlpHttpReceiver) -> None:
    http_receiver.answers.append((429, {"retry-after": "1"}))
    exp = export({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": http_receiver.endpoint}, backoff_s=0.01)
    first, second = http_receiver.requests
    assert 0.95 <= second.at - first.at < 3  # the receiver's delay, not the 10 ms backoff
    assert (exp.exported, exp.retries) == (2, 1)


def test_retries_are_bounded_by_the_timeout_then_the_batch_is_dropped(
    http_receiver: OtlpHttpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    http_receiver.answers.extend([(503, {})] * 20)
    started = time.monotonic()
    exp = export({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": http_receiver.endpoint,
                  "OTEL_EXPORTER_OTLP_TIMEOUT": "1000"}, backoff_s=0.1)
    assert time.monotonic() - started < 4  # the 1 s timeout, some slack for a busy machine
    assert 2 <= len(http_receiver.requests) <= otlp.MAX_ATTEMPTS and http_receiver.spans == []
    assert (exp.exported, exp.failed, exp.dropped) == (0, 2, 2)
    assert "dropped 2 spans" in caplog.text and "HTTP 503" in caplog.text


def test_a_retry_after_beyond_the_timeout_gives_up_at_once(http_receiver: OtlpHttpReceiver) -> None:
    http_receiver.answers.append((503, {"retry-after": "60"}))
    started = time.monotonic()
    exp = export({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": http_receiver.endpoint})
    assert time.monotonic() - started < 5 and len(http_receiver.requests) == 1 and exp.failed == 2  # not the 10 s timeout


def test_a_client_error_is_not_retried(http_receiver: OtlpHttpReceiver) -> None:
    http_receiver.answers.append((400, {}))
    exp = export({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": http_receiver.endpoint})
    assert len(http_receiver.requests) == 1 and (exp.failed, exp.retries) == (2, 0)


def test_a_collector_that_is_down_costs_a_bounded_wait_and_counted_drops() -> None:
    port = free_port()  # nothing listens there: connection refused, a retryable error
    started = time.monotonic()
    exp = export({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                  "OTEL_EXPORTER_OTLP_TIMEOUT": "800"}, backoff_s=0.1)
    assert time.monotonic() - started < 4  # the 0.8 s timeout, some slack for a busy machine
    assert exp.retries >= 1 and (exp.exported, exp.dropped) == (0, 2)
    grpc_exp = export({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                       "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_TIMEOUT": "800"},
                      backoff_s=0.1)
    assert time.monotonic() - started < 8
    assert grpc_exp.retries >= 1 and (grpc_exp.exported, grpc_exp.dropped) == (0, 2)


def test_shutdown_cuts_a_retry_wait_short(http_receiver: OtlpHttpReceiver) -> None:
    http_receiver.answers.append((503, {"retry-after": "5"}))
    span_exporter = start_exporter({}, "otlp-http", http_receiver.endpoint)
    try:
        tracing.finish(tracing.start("x", root=True))
    finally:
        tracing.disable()
    assert not span_exporter.force_flush(0.5)  # sent once, now waiting the 5 s the receiver asked for
    assert len(http_receiver.requests) == 1
    started = time.monotonic()
    span_exporter.shutdown()
    assert time.monotonic() - started < 2.5 and span_exporter.failed == 1 and len(http_receiver.requests) == 1


def test_https_with_a_custom_ca(tls: Tls) -> None:
    receiver = OtlpHttpReceiver(tls).start()
    try:
        env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
               "OTEL_EXPORTER_OTLP_TIMEOUT": "2000"}
        assert receiver.endpoint.startswith("https://")
        untrusted = export(env, backoff_s=0.1)  # the system's CAs do not know our certificate
        assert (untrusted.exported, untrusted.dropped) == (0, 2) and receiver.requests == []
        trusted = export({**env, "OTEL_EXPORTER_OTLP_CERTIFICATE": str(tls.cert)})
        assert trusted.exported == 2 and [s.name for s in receiver.spans] == ["a", "b"]
    finally:
        receiver.stop()


def test_grpc_with_tls_headers_compression_and_a_retry(tls: Tls) -> None:
    receiver = OtlpReceiver(tls).start()
    try:
        receiver.answers.append(status_pb2.Status(code=grpc.StatusCode.UNAVAILABLE.value[0], message="busy"))
        exp = export({
            "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_EXPORTER_OTLP_CERTIFICATE": str(tls.cert),
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "Authorization=Bearer%20abc", "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
        })
        assert [r.answer for r in receiver.requests] == [grpc.StatusCode.UNAVAILABLE.value[0], 0]
        assert receiver.requests[1].headers["authorization"] == "Bearer abc"
        assert (exp.exported, exp.retries) == (2, 1) and [s.name for s in receiver.spans] == ["a", "b"]
    finally:
        receiver.stop()


def test_grpc_resource_exhausted_is_retried_only_when_the_server_says_when() -> None:
    receiver = OtlpReceiver().start()
    try:
        retry_info = any_pb2.Any()
        retry_info.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=300_000_000)))
        exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        receiver.answers.extend([status_pb2.Status(code=exhausted, message="slow down", details=[retry_info]),
                                 status_pb2.Status(code=exhausted, message="full")])
        env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
               "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
        exp = export(env, backoff_s=5)  # a retry after the backoff would time the test out
        first, second = receiver.requests
        assert 0.29 <= second.at - first.at < 3  # after the RetryInfo's delay; the second, without one, is final
        assert (exp.exported, exp.failed, exp.retries) == (0, 2, 1)
    finally:
        receiver.stop()

