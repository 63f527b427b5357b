"""Issue 15's acceptance, as a user runs it: `unimodel up` with tenant keys and an admin key.

    UNIMODEL_API_KEYS='{"sk-a":"team-a","sk-b":"team-b"}' UNIMODEL_ADMIN_API_KEYS='{"sk-root":"ops"}' unimodel up

Tenants get 403 on admin routes and the admin succeeds; tenant A sees none of tenant B's cache entries, hit
log or configs; every repro of the issue's findings gets a 4xx with a clear message; the embedded NATS
refuses a connection without credentials; Ctrl-C leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from helpers.up_process import ctrl_c, kill_if_running
from unimodel.local.procs import free_port, http_ok, wait_until

A, B, ROOT = "sk-a", "sk-b", "sk-root"
MODELS = ["iris-classifier", "mlp", "smollm2-135m-instruct", "all-minilm-l6-v2"]


def auth(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def nats_answer_to_anonymous(port: int) -> str:
    """What the NATS server answers a client that connects without credentials (the protocol by hand:
    nats-py leaves its socket open when a connect is refused)."""

    async def attempt() -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            assert (await reader.readline()).startswith(b"INFO ")
            writer.write(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
            await writer.drain()
            return (await asyncio.wait_for(reader.readline(), 5)).decode()
        finally:
            writer.close()
            await writer.wait_closed()

    return asyncio.run(attempt())


@pytest.mark.timeout(400)
def test_up_with_tenant_and_admin_keys(tmp_path: Path, model_repository: Path) -> None:
    http, grpc_port, nats_port, etcd = free_port(), free_port(), free_port(), free_port()
    cmd = [
        sys.executable, "-m", "unimodel.cli", "up", "--no-prepare", "--model-repository", str(model_repository),
        "--load-models", ",".join(MODELS),
        "--http-port", str(http), "--grpc-port", str(grpc_port), "--nats-port", str(nats_port), "--etcd-port", str(etcd),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIMODEL_")}
    env["UNIMODEL_API_KEYS"] = json.dumps({A: "team-a", B: "team-b"})
    env["UNIMODEL_ADMIN_API_KEYS"] = json.dumps({ROOT: "ops"})
    log = (tmp_path / "up.log").open("w+")
    up = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    base = f"http://127.0.0.1:{http}"
    try:
        wait_until(lambda: http_ok(f"{base}/health/ready"), 90, "cluster ready")

        def ready() -> bool:
            data = {m["id"]: m for m in httpx.get(f"{base}/v1/models", headers=auth(A)).json()["data"]}
            return all(data.get(m, {}).get("instances", 0) >= 1 for m in MODELS)

        wait_until(ready, 120, "models ready")
        with httpx.Client(base_url=base, timeout=60) as c:
            # no key: 401; a tenant key: inference works, admin routes are 403; the admin key: they work
            assert c.get("/v1/models").status_code == 401
            iris = {"input": [5.1, 3.5, 1.4, 0.2]}
            r = c.post("/v1/models/iris-classifier:predict", json=iris, headers=auth(A))
            assert r.status_code == 200 and r.json()["output"]["label"] == "setosa", r.text
            for method, path, body in (
                ("DELETE", "/v1/models/iris-classifier", None),
                ("POST", "/v1/models", {"name": "iris-classifier"}),
                ("POST", "/v2/repository/models/iris-classifier/unload", {}),
                ("POST", "/v2/repository/models/iris-classifier/load", {}),
            ):
                r = c.request(method, path, json=body, headers=auth(A))
                assert r.status_code == 403, (method, path, r.status_code, r.text)
                assert "admin" in r.text, r.text
            r = c.delete("/v1/models/iris-classifier", headers=auth(ROOT))
            assert r.status_code == 200, r.text
            r = c.post("/v1/models", json={"name": "iris-classifier"}, headers=auth(ROOT))
            assert r.status_code == 202, r.text
            wait_until(
                lambda: c.post("/v1/models/iris-classifier:predict", json=iris, headers=auth(B)).status_code == 200,
                60, "iris-classifier registered again by the admin",
            )

            # configs: a tenant sees no paths, files or options; the admin sees the full config
            tenant_view = c.get("/v1/models/iris-classifier/status", headers=auth(B)).json()
            admin_view = c.get("/v1/models/iris-classifier/status", headers=auth(ROOT)).json()
            assert str(model_repository) not in json.dumps(tenant_view), tenant_view
            assert "path" not in (tenant_view.get("config") or {}), tenant_view
            assert admin_view["config"]["path"].startswith(str(model_repository.resolve())), admin_view

            # the cache: tenant B's entries and hit log are invisible to tenant A (its tenant header is ignored)
            scope = {"model": "security-up"}
            insert = {"type": "insert", "scope": scope, "chat_info": [{"query": "What is team B's secret plan?", "answer": "Plan B."}]}
            wait_until(lambda: c.post("/modelcache", json=insert, headers=auth(B)).json()["errorCode"] == 0, 60, "B's insert")
            query = {"type": "query", "scope": scope, "query": "What is team B's secret plan?"}
            assert c.post("/modelcache", json=query, headers=auth(B)).json()["cacheHit"] is True
            stolen = c.post("/modelcache", json=query, headers=auth(A, **{"x-unimodel-tenant": "team-b"})).json()
            assert stolen["cacheHit"] is False and "Plan B." not in json.dumps(stolen), stolen
            a_log = c.get("/v1/cache/log", params={"model": "security-up"}, headers=auth(A, **{"x-unimodel-tenant": "team-b"}))
            assert a_log.status_code == 200 and all(not r["hit"] for r in a_log.json()["records"]), a_log.text
            b_log = c.get("/v1/cache/log", params={"model": "security-up"}, headers=auth(ROOT, **{"x-unimodel-tenant": "team-b"}))
            assert any(r["hit"] for r in b_log.json()["records"]), b_log.text  # the admin may read any scope

            # the findings' repros: each a 4xx naming what is wrong, never a 500
            leak = {"name": "leak", "path": "iris-classifier", "config": {"processing": {"kind": "tabular", "options": {
                "feature_names": "a,b,c,d", "labels": "/etc/passwd"}}}}
            r = c.post("/v1/models", json=leak, headers=auth(ROOT))
            assert r.status_code == 403 and "labels" in r.text, r.text
            ssrf = {"name": "ssrf", "path": "smollm2-135m-instruct", "config": {"engine": "openai", "llm": {
                "upstream_url": "http://169.254.169.254/v1"}}}
            r = c.post("/v1/models", json=ssrf, headers=auth(ROOT))
            assert r.status_code == 403 and "upstream_url" in r.text, r.text
            secret = {"name": "secret", "path": "smollm2-135m-instruct", "config": {"engine": "openai", "llm": {
                "upstream_url": "http://127.0.0.1:9/v1", "upstream_api_key_env": "UNIMODEL_ADMIN_API_KEYS"}}}
            r = c.post("/v1/models", json=secret, headers=auth(ROOT))
            assert r.status_code == 403 and "upstream_api_key_env" in r.text, r.text
            r = c.post("/v1/models", json={"name": "big", "path": "mlp", "config": {"instance_count": 100000}}, headers=auth(ROOT))
            assert r.status_code == 400 and "instance_count" in r.text, r.text
            r = c.get("/v1/cache/log", params={"model": "security-up", "limit": 3000000000}, headers=auth(A))
            assert r.status_code == 400 and "limit" in r.text, r.text
            chat = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            for field, value in (("top_k", 3000000000), ("seed", 9223372036854775808)):
                r = c.post("/v1/chat/completions", json={**chat, field: value}, headers=auth(A))
                assert r.status_code == 400 and field in r.text, (field, r.text)
            infer = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [0, 18446744073709551615], "data": []}]}
            r = c.post("/v2/models/mlp/infer", json=infer, headers=auth(A))
            assert r.status_code == 400 and "shape" in r.text, r.text
            for depth in (60, 51):
                r = c.post("/v1/models/iris-classifier:predict", json={"input": nested(depth)}, headers=auth(A))
                assert r.status_code == 400 and ("deep" in r.text or "nest" in r.text), (depth, r.status_code, r.text)
            # the request id is ours; the client's is only echoed
            r = c.post("/v1/models/iris-classifier:predict", json=iris, headers=auth(A, **{"x-request-id": "mine-1"}))
            assert r.headers["x-request-id"] == "mine-1" and r.headers["x-unimodel-request-id"] != "mine-1", r.headers

        # the embedded NATS refuses a connection without credentials
        answer = nats_answer_to_anonymous(nats_port)
        assert answer.startswith("-ERR 'Authorization Violation'"), answer
        assert up.poll() is None
        ctrl_c(up, 60)
    finally:
        kill_if_running(up)
        log.close()
    text = (tmp_path / "up.log").read_text()
    assert "Traceback" not in text
    assert "WARNING: no API keys configured" not in text
