"""The vllm engine through the whole cluster, as a user runs it: `unimodel up --vllm-workers 2` starts two
gpu-workers from .venv-vllm (vLLM's CPU build), each hosting smollm2-135m-instruct-vllm (the packaged GGUF
converted to a Hugging Face folder); the openai SDK talks to the gateway, gateway -> batcher -> router ->
a worker -> vLLM's EngineCore (a child process of the worker). A conversation stays on one worker
(affinity by session); a killed worker takes its EngineCore with it and comes back; Ctrl-C leaves no
process behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from helpers.process_tree import alive, descendants
from helpers.up_process import ctrl_c, kill_if_running, status_json
from unimodel.local.procs import free_port, http_ok, wait_until

VLLM_PYTHON = Path(sys.prefix).parent / ".venv-vllm" / "bin" / "python"
MODEL = "smollm2-135m-instruct-vllm"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON.is_file(), reason=".venv-vllm is missing (scripts/setup makes it on x86-64 Linux)"),
]


def vllm_workers(etcd: int, state_dir: Path) -> dict[str, dict[str, Any]]:
    """The vllm workers by id, each with its pid."""
    data = status_json(etcd, state_dir)
    pids = {s["id"]: s["pid"] for s in data["services"]}
    return {w["id"]: {**w, "pid": pids[w["id"]]} for w in data["workers"] if "vllm" in w["engines"]}


def model_ready(base: str, instances: int = 2) -> bool:
    r = httpx.get(f"{base}/v1/models/{MODEL}/status", timeout=5)
    return r.status_code == 200 and sum(i["state"] == "READY" for i in r.json()["instances"]) >= instances


@pytest.mark.timeout(900)
def test_the_openai_sdk_through_the_cluster_to_vllm_and_its_engine_core_lives_and_dies_with_the_worker(
    tmp_path: Path, model_repository: Path
) -> None:
    http, grpc_port, nats, etcd = free_port(), free_port(), free_port(), free_port()
    cmd = [
        sys.executable, "-m", "unimodel.cli", "up", "--vllm-workers", "2", "--log-level", "debug",
        "--state-dir", str(tmp_path / "state"), "--model-repository", str(model_repository), "--load-models", MODEL,
        "--http-port", str(http), "--grpc-port", str(grpc_port), "--nats-port", str(nats), "--etcd-port", str(etcd),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIMODEL_")}
    log = (tmp_path / "up.log").open("w+")
    up = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{http}"
    try:
        wait_until(lambda: http_ok(f"{base}/health/ready"), 120, "cluster ready")
        wait_until(lambda: model_ready(base), 420, f"{MODEL} READY on both vllm workers")
        workers = vllm_workers(etcd, tmp_path / "state")
        assert len(workers) == 2
        for w in workers.values():
            assert [m["engine"] for m in w["models"] if m["name"] == MODEL] == ["vllm"]
            assert descendants(w["pid"]), "vLLM's EngineCore runs as a child of the worker"
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)

        # affinity: each conversation (x-session-id) stays on one worker; the conversations spread over both
        homes: dict[str, set[str]] = {}
        for turn in range(2):
            for session in (f"conversation-{i}" for i in range(12)):
                r = client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=[{"role": "user", "content": f"Hello ({turn})"}], max_tokens=2,
                    extra_headers={"x-session-id": session},
                )
                homes.setdefault(session, set()).add(r.headers["x-unimodel-worker"])
        assert all(len(h) == 1 for h in homes.values()), homes
        assert set().union(*homes.values()) == set(workers), homes  # 12 sessions, rendezvous-hashed over 2 workers

        # chat, blocking and streamed (greedy: the same text both ways), with usage
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        reply = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, max_tokens=24, temperature=0, extra_headers={"x-session-id": "s1"}
        )
        worker = workers[reply.headers["x-unimodel-worker"]]
        cores = descendants(worker["pid"])
        answer = reply.parse()
        assert "Paris" in answer.choices[0].message.content
        assert answer.usage.completion_tokens <= 24 and answer.usage.prompt_tokens > 5
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True,
            stream_options={"include_usage": True},
        ))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == answer.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
        # completions, and a length cut
        text = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=6, temperature=0)
        assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 6
        # the model's limits, before anything streams
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5000)
        assert caught.value.code == "max_tokens"
        # several sequences at once (continuous batching in the engine)
        many = [
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Say the number {i}."}], max_tokens=8
            )
            for i in range(2)
        ]
        assert all(m.usage.completion_tokens >= 1 for m in many)

        # a client that leaves aborts its generation in vLLM
        with client.chat.completions.create(
            model=MODEL, stream=True, max_tokens=900, temperature=0,
            messages=[{"role": "user", "content": "Write a very long story about a dragon, with many chapters."}],
        ) as stream:
            for i, _chunk in enumerate(stream):
                if i >= 3:
                    break
        wait_until(lambda: "aborted 1 generation(s)" in Path(log.name).read_text(), 15, "the worker aborts the generation")

        # kill -9 of the worker: its EngineCore goes too; the worker comes back and serves the model again
        os.kill(worker["pid"], signal.SIGKILL)
        wait_until(lambda: not any(alive(p) for p in cores), 30, "the killed worker's EngineCore to exit")
        wait_until(
            lambda: worker["id"] not in (now := vllm_workers(etcd, tmp_path / "state")) and len(now) == 2 and model_ready(base), 300,
            "the killed vllm worker back",
        )
        again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
        assert again.choices[0].message.content == answer.choices[0].message.content

        ctrl_c(up, 120)
    finally:
        kill_if_running(up)
        log.close()
    text = (tmp_path / "up.log").read_text()
    assert "vllm-worker-0 |" in text and "vllm-worker-1 |" in text and "was killed by SIGKILL" in text
    assert "Traceback" not in text, text[-5000:]
