"""Issue 15, safe model registration, against the real services (nats-server, etcd, router, batcher, a
gpu-worker, the gateway): the /etc/passwd repro refused at POST /v1/models, and the openai engine checked
again at the worker, whose settings allow fewer upstream key variables than the gateway's. The upstream is a
real HTTP server on loopback that records what it is sent and answers 401 with a body that must not reach
the model's status."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from helpers.support import Infra, Services
from unimodel.local.procs import free_port, http_ok, wait_until

KEY_ENV = "SECURITY_TEST_UPSTREAM_KEY"  # not UNIMODEL_*: the services inherit it
KEY = "sk-worker-secret-7f3a"
BODY_SECRET = "sk-LEAKED-IN-BODY-91c2"


@dataclass
class Upstream:
    url: str
    seen: list[tuple[str, str]] = field(default_factory=list)  # (path, Authorization)


@dataclass
class Cluster:
    url: str
    root: Path
    upstream: Upstream

    def register(self, body: dict) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/models", json=body, timeout=30)

    def status(self, name: str) -> dict:
        r = httpx.get(f"{self.url}/v1/models/{name}/status", timeout=5)
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    """An OpenAI-style server that refuses every key: 401 with a body naming a secret."""
    seen: list[tuple[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append((self.path, self.headers.get("Authorization", "")))
            body = json.dumps({"error": {"message": f"Incorrect API key provided: {BODY_SECRET}"}}).encode()
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Upstream(f"http://127.0.0.1:{server.server_address[1]}/v1", seen)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_repository: Path, upstream: Upstream) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("models-root")
    shutil.copytree(model_repository / "iris-classifier", root / "iris-classifier")
    infra = Infra(tmp_path_factory.mktemp("security-registration"))
    services = Services(infra)
    old = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = KEY  # in every service's environment: the worker could send it
    try:
        infra.start()
        services.start("router")
        services.start("batcher")
        # the worker allows loopback upstreams but no key variable at all
        services.start("gpu-worker", "--instance-id", "worker-0", "--upstream-urls", "http://127.0.0.1", name="worker-0")
        services.http_port, services.grpc_port = free_port(), free_port()
        gw = services.start(
            "gateway", "--http-port", str(services.http_port), "--grpc-port", str(services.grpc_port),
            "--models-root", str(root), "--upstream-urls", "http://127.0.0.1", "--upstream-key-envs", KEY_ENV,
        )  # fmt: skip
        wait_until(lambda: http_ok(f"{services.url}/health/ready"), 60, "gateway ready", gw)
        yield Cluster(services.url, root, upstream)
    finally:
        services.stop()
        infra.stop()
        if old is None:
            os.environ.pop(KEY_ENV, None)
        else:
            os.environ[KEY_ENV] = old


def _upstream_folder(cluster: Cluster, name: str, **llm: str) -> str:
    folder = cluster.root / name
    folder.mkdir(exist_ok=True)
    config = {"name": name, "engine": "openai", "max_batch_size": 4, "llm": {"upstream_url": cluster.upstream.url, **llm}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return name


def _failed_error(cluster: Cluster, name: str) -> str:
    errors: list[str] = []

    def failed() -> bool:
        status = cluster.status(name)
        errors[:] = [i["error"] for i in status["instances"] if i["state"] == "FAILED"]
        return bool(errors)

    wait_until(failed, 60, f"model {name} to fail on the worker")
    return errors[0]


def test_finding_labels_etc_passwd_is_a_403(cluster: Cluster) -> None:
    """The issue's repro: before, :predict answered "label": "root:x:0:0:root:/root:/bin/bash"."""
    options = {"feature_names": "a,b,c,d", "labels": "/etc/passwd"}
    body = {"name": "leak", "path": "iris-classifier", "config": {"processing": {"kind": "tabular", "options": options}}}
    r = cluster.register(body)
    assert r.status_code == 403, r.text
    assert "processing.options.labels" in r.text and "root:x" not in r.text
    assert httpx.get(f"{cluster.url}/v1/models/leak/status", timeout=5).status_code == 404
    # the same registration without the override is fine
    del options["labels"]
    assert cluster.register(body).status_code == 202


def test_finding_registration_out_of_range_is_a_400(cluster: Cluster) -> None:
    r = cluster.register({"name": "big", "path": "iris-classifier", "config": {"instance_count": 100_000}})
    assert r.status_code == 400, r.text
    assert "instance_count" in r.text and "1..64" in r.text


def test_finding_upstream_url_not_allowed_is_a_403(cluster: Cluster) -> None:
    name = _upstream_folder(cluster, "metadata", upstream_url="http://169.254.169.254/latest")
    r = cluster.register({"path": name})
    assert r.status_code == 403, r.text
    assert "llm.upstream_url" in r.text and "upstream_urls" in r.text


def test_finding_worker_refuses_a_key_env_its_settings_do_not_list(cluster: Cluster) -> None:
    """The gateway allows KEY_ENV; this worker's upstream_key_envs is empty: it refuses to load the model
    and never sends the variable's value anywhere."""
    name = _upstream_folder(cluster, "keyed", upstream_api_key_env=KEY_ENV)
    r = cluster.register({"path": name})
    assert r.status_code == 202, r.text
    error = _failed_error(cluster, "keyed")
    assert "llm.upstream_api_key_env" in error and "upstream_key_envs" in error
    assert all(KEY not in auth for _path, auth in cluster.upstream.seen)


def test_upstream_error_bodies_are_not_in_the_model_status(cluster: Cluster) -> None:
    name = _upstream_folder(cluster, "keyless")
    r = cluster.register({"path": name})
    assert r.status_code == 202, r.text
    error = _failed_error(cluster, "keyless")
    assert "answered HTTP 401" in error
    assert BODY_SECRET not in json.dumps(cluster.status("keyless"))
    assert any(path.endswith("/models") for path, _auth in cluster.upstream.seen)  # it was asked
