"""`unimodel up` as a user runs it: starts everything, serves, and Ctrl-C leaves no process behind."""

from __future__ import annotations

import base64
import collections
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import sklearn.datasets

from helpers.process_tree import alive, descendants
from helpers.up_process import ctrl_c, kill_if_running, status_json
from unimodel.local.procs import free_port, http_ok, wait_until


class PredictLoad:
    """Clients sending predict requests back to back (one model each); every answer's status counted."""

    BODIES = {
        "mlp": {"input": [[0.5] * 384]},
        "iris-classifier": {"input": [5.1, 3.5, 1.4, 0.2]},
        "echo": {"input": "hi"},
        "identity": {"input": [[1.0, 2.0]]},
    }

    def __init__(self, base: str) -> None:
        self.base = base
        self.stop = threading.Event()
        self.codes: collections.Counter[int | str] = collections.Counter()
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(m,), daemon=True) for m in self.BODIES]

    def _run(self, model: str) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                try:
                    r = client.post(f"{self.base}/v1/models/{model}:predict", json=self.BODIES[model])
                except httpx.HTTPError as exc:
                    self.codes[type(exc).__name__] += 1
                    continue
                self.codes[r.status_code] += 1
                if r.status_code != 200:
                    self.errors.append(f"{model}: {r.status_code} {r.text[:200]}")

    def __enter__(self) -> PredictLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


@pytest.mark.timeout(420)
def test_up_with_defaults_serves_survives_a_killed_worker_and_ctrl_c_leaves_nothing(
    tmp_path: Path, model_repository: Path
) -> None:
    http, grpc_port, nats, etcd = free_port(), free_port(), free_port(), free_port()
    # The default, relative state directory (.unimodel) in a new working directory; its models folder is
    # the repository the suite prepared once, so `up` runs prepare over it (all skipped) as a user's
    # second start would, and registers every model in it.
    (tmp_path / ".unimodel").mkdir()
    (tmp_path / ".unimodel" / "models").symlink_to(model_repository)
    cmd = [
        sys.executable, "-m", "unimodel.cli", "up", "--workers", "2",
        "--http-port", str(http), "--grpc-port", str(grpc_port), "--nats-port", str(nats), "--etcd-port", str(etcd),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIMODEL_")}
    log = (tmp_path / "up.log").open("w+")
    up = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{http}/health/ready"), 90, "cluster ready")
        wait_until(lambda: "UniModel is up" in Path(log.name).read_text(), 10, "endpoints printed")
        assert f"state  {tmp_path / '.unimodel'}" in Path(log.name).read_text()
        base = f"http://127.0.0.1:{http}"
        demo = ["efficientnet-lite0", "iris-classifier", "mlp", "identity", "delay", "smollm2-135m-instruct", "whisper-base"]

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
        # the cache on the Milvus Lite server `up` started, with its database under the relative state dir
        scope = {"model": "up-test"}
        insert = {"type": "insert", "scope": scope, "chat_info": [{"query": "What colour is the sky?", "answer": "Blue."}]}
        wait_until(lambda: httpx.post(f"{base}/modelcache", json=insert, timeout=30).json()["errorCode"] == 0, 60, "cache insert")
        hit = httpx.post(f"{base}/modelcache", json={"type": "query", "scope": scope, "query": "What color is the sky?"}, timeout=30)
        assert hit.json()["cacheHit"] is True and hit.json()["answer"] == "Blue.", hit.text
        assert (tmp_path / ".unimodel" / "milvus" / "milvus.db").exists()

        # kill -9 of the gpu-worker that streams a generation, while 4 clients send predict requests
        before = status_json(etcd, tmp_path / ".unimodel")
        assert {s["host"] for s in before["services"]} == {socket.gethostname()}
        workers = {w["id"] for w in before["workers"] if w["kind"] == "gpu-worker"}
        with PredictLoad(base) as load, httpx.Client(timeout=60) as client:
            time.sleep(1)
            chat = {"model": "smollm2-135m-instruct", "stream": True, "max_tokens": 300, "cache": False,
                    "messages": [{"role": "user", "content": "Tell me a very long story about a dragon."}]}
            with client.stream("POST", f"{base}/v1/chat/completions", json=chat) as stream:
                assert stream.status_code == 200
                victim = stream.headers["x-unimodel-worker"]
                pid = next(s["pid"] for s in before["services"] if s["id"] == victim)
                lines = stream.iter_lines()
                assert next(lines).startswith("data: {")  # the stream runs
                os.kill(pid, signal.SIGKILL)
                killed = time.monotonic()
                rest = [line for line in lines if line]
            ended_s = time.monotonic() - killed
            # never a silent cut, nor a wait for the deadline: the generation moves to the restarted worker
            # (mid-stream migration) when it has loaded the model in time, else an error event ends it
            assert rest[-1] == "data: [DONE]", rest[-3:]
            last = json.loads(rest[-2].removeprefix("data: "))
            if "error" in last:
                assert last["error"]["code"] == "unavailable" and victim in last["error"]["message"], last
                assert ended_s < 5, ended_s
            else:
                assert last["choices"][0]["finish_reason"] in ("stop", "length"), last
                assert f"moved from worker {victim}" in Path(log.name).read_text()
                assert ended_s < 120, ended_s  # the rest of 300 tokens, on a worker that shares 2 cores with 4 busy clients

            newcomer: list[str] = []

            def replaced() -> bool:
                now = [w for w in status_json(etcd, tmp_path / ".unimodel")["workers"] if w["kind"] == "gpu-worker"]
                new = [w for w in now if w["id"] not in workers]
                newcomer[:] = [w["id"] for w in new]
                return bool(new) and {m["name"] for m in new[0]["models"] if m["state"] == "READY"} >= {*demo, "echo"}

            wait_until(replaced, max(5.0, killed + 10 - time.monotonic()), "the restarted gpu-worker READY with every demo model")
            back_s = time.monotonic() - killed
            # ... and takes traffic again
            served = {httpx.post(f"{base}/v1/models/echo:predict", json={"input": i}).headers["x-unimodel-worker"]
                      for i in range(40)}
            assert newcomer[0] in served, (newcomer, served)
        sys.stderr.write(f"kill -9 {victim}: stream ended after {ended_s:.2f}s ({len(rest)} events after the kill), "
                         f"worker back READY after {back_s:.2f}s, predict answers {dict(load.codes)}\n")
        assert load.codes[200] > 0 and set(load.codes) == {200}, (dict(load.codes), load.errors[:5])
        text = Path(log.name).read_text()
        assert "was killed by SIGKILL; restarting in 0.5s" in text
        assert up.poll() is None  # the cluster stays up

        # nats-server, etcd, Milvus Lite, router, batcher, cache, embedding-worker, 2 gpu-workers, gateway
        assert len(descendants(up.pid)) >= 10
        ctrl_c(up, 60)
    finally:
        kill_if_running(up)
        log.close()
    text = (tmp_path / "up.log").read_text()
    for prefix in ("nats |", "etcd |", "gateway |", "router |", "batcher |", "cache |", "embedding-worker |", "gpu-worker-1 |"):
        assert prefix in text, f"no log line prefixed {prefix!r}"
    assert "Traceback" not in text


def test_a_second_up_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    from unimodel.local.cluster import LOCK_FILE, state_dir_holder

    lock = (tmp_path / LOCK_FILE).open("a+")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lock.write("4242\n")
    lock.flush()
    try:
        assert state_dir_holder(tmp_path) == 4242
        proc = subprocess.run(
            [sys.executable, "-m", "unimodel.cli", "up", "--no-prepare"], capture_output=True, text=True, timeout=60,
            cwd=tmp_path.parent, env={**os.environ, "UNIMODEL_STATE_DIR": str(tmp_path)},
        )
    finally:
        lock.close()
    assert proc.returncode == 1
    assert f"state directory {tmp_path} is in use by another `unimodel up` (pid 4242)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert state_dir_holder(tmp_path) is None


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


def test_a_service_that_refuses_its_settings_stops_the_cluster_naming_it(tmp_path: Path) -> None:
    """Exit code 2 (a bad setting) is not restarted: `up` says which service and why, stops every child and
    exits 1."""
    config = tmp_path / "unimodel.yaml"
    config.write_text("gateway:\n  max_body_bytes: 10\n")
    up = subprocess.Popen(
        [sys.executable, "-m", "unimodel.cli", "up", "--no-prepare", "--config", str(config), "--state-dir", "state",
         "--http-port", str(free_port()), "--grpc-port", str(free_port()), "--nats-port", str(free_port()),
         "--etcd-port", str(free_port())],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("UNIMODEL_")},
    )
    seen: set[int] = set()
    while up.poll() is None:  # its children, while they live
        seen |= descendants(up.pid)
        time.sleep(0.2)
    out, err = up.communicate(timeout=60)
    assert up.returncode == 1, err
    assert "unimodel up: error: gateway exited with code 2 (" in err
    assert "invalid setting max_body_bytes" in err and "a bad setting, not restarted" in err
    assert "Traceback" not in out + err
    assert len(seen) >= 4 and not [p for p in seen if alive(p)]
