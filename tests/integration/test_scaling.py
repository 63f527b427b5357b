"""Worker pools grow and shrink under load with a real ONNX model (issue 3, "Scaling"):

- a gpu-worker started while traffic flows gets its share of the traffic within 2 s of registering
  (the router sees it in etcd, places the model on it, the worker loads it and reports READY);
- stopping a worker under concurrent load, with SIGTERM or kill -9, loses no accepted request: every
  request gets the right answer (compared with ONNX Runtime run here on the same model file).
"""

from __future__ import annotations

import datetime
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from helpers.support import Services, router_view
from unimodel.local.procs import ManagedProcess, wait_until

CONCURRENCY = 6


class MlpLoad:
    """CONCURRENCY threads sending KServe v2 JSON infer requests to `mlp` back to back; each answer is
    checked against ONNX Runtime's output for the same input."""

    def __init__(self, services: Services, repository: Path) -> None:
        session = ort.InferenceSession(str(repository / "mlp" / "model.onnx"), providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(7)
        self.inputs = [rng.standard_normal((1, 384), dtype=np.float32) for _ in range(CONCURRENCY)]
        self.expected = [session.run(None, {"INPUT0": x})[0] for x in self.inputs]
        self.url = f"{services.url}/v2/models/mlp/infer"
        self.results: list[tuple[float, str, str]] = []  # (time.time() of the answer, worker id, "" or the failure)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(CONCURRENCY)]

    def _run(self, i: int) -> None:
        body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 384], "data": self.inputs[i].ravel().tolist()}]}
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                failure = ""
                try:
                    r = client.post(self.url, json=body)
                except httpx.HTTPError as exc:
                    failure = f"{type(exc).__name__}: {exc}"
                    worker = ""
                else:
                    worker = r.headers.get("x-unimodel-worker", "")
                    if r.status_code != 200:
                        failure = f"HTTP {r.status_code}: {r.text[:200]}"
                    else:
                        out = np.asarray(r.json()["outputs"][0]["data"], dtype=np.float32).reshape(1, 10)
                        if not np.allclose(out, self.expected[i], rtol=1e-4, atol=1e-5):
                            failure = "wrong output"
                with self._lock:
                    self.results.append((time.time(), worker, failure))

    def failures(self) -> list[tuple[float, str, str]]:
        return [r for r in self.results if r[2]]

    def first_answer_from(self, worker: str) -> float | None:
        return next((t for t, w, f in list(self.results) if w == worker and not f), None)

    def __enter__(self) -> MlpLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(90)


def _registered_at(proc: ManagedProcess, instance: str, timeout: float) -> float:
    """When the worker registered: the time stamp of its "<id> ready" log line, written right after it
    put its key in etcd (log times are local wall-clock times of today)."""
    needle = f"{instance} ready"
    wait_until(lambda: any(needle in line for line in proc.lines), timeout, f"{instance} registered", proc)
    line = next(line for line in proc.lines if needle in line)
    stamp = re.search(r"(\d\d):(\d\d):(\d\d)\.(\d{3})", line)
    assert stamp, line
    h, m, sec, ms = (int(g) for g in stamp.groups())
    now = datetime.datetime.now()
    return now.replace(hour=h, minute=m, second=sec, microsecond=ms * 1000).timestamp()


def test_a_new_worker_gets_traffic_within_2s_of_registering(services: Services, model_repository: Path) -> None:
    services.start_cluster(workers=1, all_six=False, repository=model_repository, models="mlp")
    with MlpLoad(services, model_repository) as load:
        wait_until(lambda: len(load.results) >= 20, 30, "traffic on worker-0")
        worker = services.start("gpu-worker", "--instance-id", "worker-1", name="worker-1")
        registered = _registered_at(worker, "worker-1", 60)
        wait_until(lambda: load.first_answer_from("worker-1") is not None, 10, "an answer from worker-1")
        first = load.first_answer_from("worker-1")
        assert first is not None
        time.sleep(1.0)
    delay = first - registered
    shares = {w: sum(1 for _t, x, f in load.results if x == w and not f and _t > first) for w in ("worker-0", "worker-1")}
    print(f"worker-1 answered {delay:.2f}s after registering; answers since then: {shares}")
    assert not load.failures(), load.failures()[:5]
    assert delay <= 2.0
    assert shares["worker-1"] > 0 and shares["worker-0"] > 0


@pytest.mark.parametrize("how", ["sigterm", "kill9"])
def test_stopping_a_worker_under_load_loses_no_request(services: Services, model_repository: Path, how: str) -> None:
    workers = services.start_cluster(workers=2, all_six=False, repository=model_repository, models="mlp")
    services.wait_models(["mlp"], instances=2)
    wait_until(lambda: router_view(services.infra) == {"worker-0", "worker-1"}, 15, "router sees both workers")
    with MlpLoad(services, model_repository) as load:
        wait_until(lambda: {w for _t, w, _f in load.results} >= {"worker-0", "worker-1"}, 30, "traffic on both workers")
        stopped_at = time.time()
        if how == "sigterm":
            workers[0].signal(signal.SIGTERM)
            assert workers[0].wait(30) == 0
        else:
            workers[0].kill()
        wait_until(lambda: router_view(services.infra) == {"worker-1"}, services.lease_ttl_s + 5, "router drops worker-0")
        dropped_at = time.time()
        time.sleep(1.0)
    after = [w for t, w, f in load.results if t > dropped_at + 0.5 and not f]
    print(f"{how}: {len(load.results)} requests, {len(load.failures())} failed; "
          f"worker-0 left the router's view {dropped_at - stopped_at:.2f}s after the stop")
    assert not load.failures(), load.failures()[:5]
    assert after and set(after) == {"worker-1"}
