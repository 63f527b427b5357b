"""`unimodel healthcheck` (the images' HEALTHCHECK and compose's healthchecks) against a real grpc.health.v1
server and a real HTTP server on free ports: its exit status and the reason it prints."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from unimodel.local.procs import free_port


def healthcheck(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("UNIMODEL_")}
    return subprocess.run([sys.executable, "-m", "unimodel.cli", "healthcheck", *args], capture_output=True,
                          text=True, timeout=30, env={**base, **(env or {})})


@pytest.fixture
def health_server() -> Iterator[tuple[int, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, servicer
    finally:
        server.stop(None)


def test_serving_is_exit_0_and_not_serving_exit_1_with_the_status(health_server: tuple[int, health.HealthServicer]) -> None:
    port, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck("--grpc-port", str(port)).returncode == 0
    # the port from the setting every service reads (what the image's HEALTHCHECK relies on)
    assert healthcheck(env={"UNIMODEL_GRPC_PORT": str(port)}).returncode == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    result = healthcheck("--grpc-port", str(port))
    assert result.returncode == 1 and f"127.0.0.1:{port}: NOT_SERVING" in result.stderr, result.stderr
    # --service asks another health service: the process's liveness
    servicer.set("liveness", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck("--grpc-port", str(port), "--service", "liveness").returncode == 0


def test_nothing_listening_is_exit_1_unreachable() -> None:
    result = healthcheck("--grpc-port", str(free_port()), "--timeout-s", "1")
    assert result.returncode == 1 and "unreachable: UNAVAILABLE" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("env", [{}, {"UNIMODEL_GRPC_PORT": "0"}, {"UNIMODEL_GRPC_PORT": "x"}])
def test_no_usable_port_is_exit_2_naming_the_setting(env: dict[str, str]) -> None:
    result = healthcheck(env=env)
    assert result.returncode == 2 and "UNIMODEL_GRPC_PORT" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


class _Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/ok" else 503)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_http_2xx_is_exit_0_and_503_exit_1() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ready)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert healthcheck("--http", f"{base}/ok").returncode == 0
        result = healthcheck("--http", f"{base}/health/ready")
        assert result.returncode == 1 and "HTTP 503" in result.stderr, result.stderr
    finally:
        server.shutdown()
        server.server_close()
