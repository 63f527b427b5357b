"""`unimodel status` against a running cluster (real nats-server, etcd, the six services, two workers and
a model from the repository), run as operators run it: the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from helpers.support import Infra, Services
from unimodel.core.kinds import SERVICE_KINDS
from unimodel.local.procs import free_port


def status(infra: Infra, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "unimodel.cli", "status", "--etcd-endpoints", infra.etcd.endpoint, *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **infra.etcd_env()},
    )


def test_status_shows_services_workers_models_and_queues(services: Services, model_repository: Path) -> None:
    services.start_cluster(workers=2, all_six=True, repository=model_repository, models="mlp")
    # traffic for two queues: echo (not registered: the batcher's default policy) and mlp (its own)
    assert services.predict("hi").status_code == 200
    body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 384], "data": [0.5] * 384}]}
    assert httpx.post(f"{services.url}/v2/models/mlp/infer", json=body, timeout=30).status_code == 200

    done = status(services.infra, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    view = json.loads(done.stdout)
    assert view["healthy"] is True and view["problems"] == []
    assert sorted(s["kind"] for s in view["services"]) == sorted([*SERVICE_KINDS, "gpu-worker"])
    assert all(s["health"] == "SERVING" and s["grpc_address"] and s["version"] for s in view["services"])

    workers = {w["id"]: w for w in view["workers"]}
    assert {"worker-0", "worker-1"} <= set(workers)
    for wid in ("worker-0", "worker-1"):
        hosted = {m["name"]: m for m in workers[wid]["models"]}
        assert hosted["echo"]["state"] == "READY" and hosted["echo"]["pinned"] is True
        assert workers[wid]["outstanding"] == 0 and "onnx" in workers[wid]["engines"]
    (mlp,) = [m for m in view["models"] if m["name"] == "mlp"]
    assert mlp["engine"] == "onnx" and mlp["ready_on"] and set(mlp["ready_on"]) <= {"worker-0", "worker-1"}
    assert mlp["max_batch_size"] > 1
    hosting = [w for w in view["workers"] if any(m["name"] == "mlp" and m["state"] == "READY" for m in w["models"])]
    assert [w["id"] for w in hosting] == mlp["ready_on"]

    queues = {q["model"]: q for q in view["queues"]}
    assert queues["echo"]["registered"] is False and queues["mlp"]["registered"] is True
    assert queues["mlp"]["max_batch_size"] == mlp["max_batch_size"] and queues["mlp"]["queued"] == 0
    assert all(q["batcher"].startswith("batcher-") and q["max_inflight_batches"] >= 1 for q in queues.values())

    # the same as tables
    done = status(services.infra)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for section in ("SERVICES", "WORKERS", "MODELS", "QUEUES"):
        assert f"\n{section}\n" in text
    assert "worker-1" in text and "READY (pinned)" in text and "healthy:" in text and "PROBLEMS" not in text

    # a service stops (it leaves etcd): status says so and exits 1
    cache = next(p for p in services.procs if p.name == "cache")
    cache.stop(20)
    done = status(services.infra, "--json")
    assert done.returncode == 1, done.stdout
    assert json.loads(done.stdout)["problems"] == ["no cache is registered"]


def test_status_exits_2_when_etcd_cannot_be_read(infra: Infra) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "unimodel.cli", "status", "--etcd-endpoints", f"127.0.0.1:{free_port()}", "--timeout", "1"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("unimodel status: error: ") and "Traceback" not in done.stderr
    # an empty etcd: nothing is registered, every kind is reported missing
    done = status(infra, "--json")
    assert done.returncode == 1
    assert json.loads(done.stdout)["problems"] == [f"no {kind} is registered" for kind in SERVICE_KINDS]
