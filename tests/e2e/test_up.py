"""`unimodel up` as a user runs it: starts everything, serves, and Ctrl-C leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

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


def test_up_serves_then_ctrl_c_leaves_nothing(tmp_path: Path) -> None:
    http, grpc_port, nats, etcd = free_port(), free_port(), free_port(), free_port()
    cmd = [
        sys.executable, "-m", "unimodel.cli", "up", "--workers", "2", "--state-dir", str(tmp_path / "state"),
        "--http-port", str(http), "--grpc-port", str(grpc_port), "--nats-port", str(nats), "--etcd-port", str(etcd),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIMODEL_")}
    log = (tmp_path / "up.log").open("w+")
    up = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{http}/health/ready"), 90, "cluster ready")
        wait_until(lambda: "UniModel is up" in Path(log.name).read_text(), 10, "endpoints printed")
        models = httpx.get(f"http://127.0.0.1:{http}/v1/models").json()["data"]
        assert models[0]["id"] == "echo"
        wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{http}/v1/models").json()["data"][0]["instances"] == 2, 10, "2 workers"
        )
        r = httpx.post(f"http://127.0.0.1:{http}/v1/models/echo:predict", json={"input": "hi"})
        assert r.status_code == 200 and r.json()["output"] == "hi"

        children = descendants(up.pid)
        # nats-server, etcd, router, batcher, cache, embedding-worker, 2 gpu-workers, gateway
        assert len(children) >= 9, children

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
