"""`unimodel up` as a user runs it: starts everything, serves, and Ctrl-C leaves no process behind."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import sklearn.datasets

from unimodel.local.procs import free_port, http_ok, wait_until


def descendants(pid: int) -> set[int]:
    """Every process whose parent chain leads to `pid` (read from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        children = {p for p, ppid in parents.items() if ppid in frontier}
        frontier = children - found
        found |= children
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_up_serves_demo_models_then_ctrl_c_leaves_nothing(tmp_path: Path, model_repository: Path) -> None:
    http, grpc_port, nats, etcd = free_port(), free_port(), free_port(), free_port()
    # The repository the test suite prepared once: `up` runs prepare over it (all skipped) as a user's
    # second start would, and registers every model in it.
    cmd = [
        sys.executable, "-m", "unimodel.cli", "up", "--workers", "2", "--state-dir", str(tmp_path / "state"),
        "--http-port", str(http), "--grpc-port", str(grpc_port), "--nats-port", str(nats), "--etcd-port", str(etcd),
        "--model-repository", str(model_repository),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIMODEL_")}
    log = (tmp_path / "up.log").open("w+")
    up = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{http}/health/ready"), 90, "cluster ready")
        wait_until(lambda: "UniModel is up" in Path(log.name).read_text(), 10, "endpoints printed")
        base = f"http://127.0.0.1:{http}"
        demo = ["efficientnet-lite0", "iris-classifier", "mlp", "identity", "delay"]

        def all_ready() -> bool:
            data = {m["id"]: m for m in httpx.get(f"{base}/v1/models").json()["data"]}
            # the embedding model runs on the embedding-worker alone, the rest on both gpu-workers
            return all(data.get(m, {}).get("instances") == 2 for m in demo) and (
                data.get("all-minilm-l6-v2", {}).get("instances") == 1
            )

        wait_until(all_ready, 120, "demo models ready on 2 workers")
        r = httpx.post(f"{base}/v1/models/all-minilm-l6-v2:predict", json={"input": "a cat sits on the mat"})
        assert r.status_code == 200, r.text
        vec = r.json()["output"]["embedding"]
        assert len(vec) == 384 and abs(sum(v * v for v in vec) - 1) < 1e-3
        image = base64.b64encode(Path(sklearn.datasets.__file__).parent.joinpath("images", "flower.jpg").read_bytes())
        r = httpx.post(f"{base}/v1/models/efficientnet-lite0:predict", json={"input": image.decode()}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["output"]["labels"][0]["label"] == "daisy"
        r = httpx.post(f"{base}/v1/models/iris-classifier:predict", json={"input": [5.1, 3.5, 1.4, 0.2]})
        assert r.status_code == 200 and r.json()["output"]["label"] == "setosa", r.text
        r = httpx.post(f"{base}/v1/models/echo:predict", json={"input": "hi"})
        assert r.status_code == 200 and r.json()["output"] == "hi"
        # the cache on the Milvus Lite server `up` started
        scope = {"model": "up-test"}
        insert = {"type": "insert", "scope": scope, "chat_info": [{"query": "What colour is the sky?", "answer": "Blue."}]}
        wait_until(lambda: httpx.post(f"{base}/modelcache", json=insert, timeout=30).json()["errorCode"] == 0, 60, "cache insert")
        hit = httpx.post(f"{base}/modelcache", json={"type": "query", "scope": scope, "query": "What color is the sky?"}, timeout=30)
        assert hit.json()["cacheHit"] is True and hit.json()["answer"] == "Blue.", hit.text

        children = descendants(up.pid)
        # nats-server, etcd, Milvus Lite, router, batcher, cache, embedding-worker, 2 gpu-workers, gateway
        assert len(children) >= 10, children

        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0
        deadline = time.monotonic() + 5
        while any(alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in children if alive(p)]
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)
        log.close()
    text = (tmp_path / "up.log").read_text()
    for prefix in ("nats |", "etcd |", "gateway |", "router |", "batcher |", "cache |", "embedding-worker |", "gpu-worker-1 |"):
        assert prefix in text, f"no log line prefixed {prefix!r}"
    assert "Traceback" not in text


def test_up_reports_a_busy_port_in_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        busy = s.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "unimodel.cli", "up", "--http-port", str(busy), "--state-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=60,
        )
    assert proc.returncode == 1
    assert f"HTTP port {busy} on 127.0.0.1 is in use (choose another with --http-port)" in proc.stderr
    assert "Traceback" not in proc.stderr
