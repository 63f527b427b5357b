"""Continuous batching end to end: streamed chats through the gateway, batcher and router to ONE gpu-worker
running SmolLM2-135M-Instruct on llama.cpp with its default 4 sequence slots (real nats-server, etcd,
services). Concurrent chats overlap in time and give the text each gives alone (greedy); a client that
disconnects aborts its own generation only; min_tokens and ignore_eos fix the output length on chat and
completions, streamed or not.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from helpers.support import metric_total, one_worker_cluster
from unimodel.local.procs import wait_until

MODEL = "smollm2-135m-instruct"
pytestmark = pytest.mark.timeout(300)
QUESTIONS = ["What is the capital of France?", "Tell me about Paris.", "Count from 1 to 20.", "Write a haiku about the sea."]


class Cluster:
    def __init__(self, url: str, metrics_port: int) -> None:
        self.url, self.metrics_port = url, metrics_port

    def worker_metric(self, name: str, **labels: str) -> float:
        return metric_total(f"http://127.0.0.1:{self.metrics_port}/metrics", name, **labels)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_repository: Path) -> Iterator[Cluster]:
    with one_worker_cluster(tmp_path_factory.mktemp("llm-batching"), model_repository, [MODEL]) as (services, metrics):
        status = httpx.get(f"{services.url}/v1/models/{MODEL}/status", timeout=5).json()
        assert status["state"] == "READY", status
        yield Cluster(services.url, metrics)


async def stream_chat(client: httpx.AsyncClient, question: str, **body: object) -> tuple[str, float, float, dict]:
    """(text, time of the first text chunk, time of the end, usage) of one streamed chat."""
    payload = {
        "model": MODEL, "messages": [{"role": "user", "content": question}], "stream": True,
        "stream_options": {"include_usage": True}, "temperature": 0, "max_tokens": 40, **body,
    }  # fmt: skip
    text, first, usage = "", 0.0, {}
    async with client.stream("POST", "/v1/chat/completions", json=payload) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    text += choice["delta"]["content"]
                    first = first or time.monotonic()
    return text, first, time.monotonic(), usage


async def test_concurrent_streamed_chats_overlap_and_match_their_text_alone(cluster: Cluster) -> None:
    async with httpx.AsyncClient(base_url=cluster.url, timeout=120) as client:
        alone = [await stream_chat(client, q) for q in QUESTIONS]
        together = await asyncio.gather(*(stream_chat(client, q) for q in QUESTIONS))
    assert [t[0] for t in together] == [a[0] for a in alone]
    assert [t[3] for t in together] == [a[3] for a in alone]  # the same token counts
    # every one had text before any of them ended: they shared the worker's decode steps
    assert max(t[1] for t in together) < min(t[2] for t in together)


async def test_a_client_that_leaves_aborts_only_its_own_generation(cluster: Cluster) -> None:
    aborted_before = cluster.worker_metric("unimodel_worker_generations_total", finish_reason="abort")
    async with httpx.AsyncClient(base_url=cluster.url, timeout=120) as client:
        alone = [await stream_chat(client, q) for q in QUESTIONS[1:]]

        async def leave() -> int:
            payload = {
                "model": MODEL, "messages": [{"role": "user", "content": "Count from 1 to 1000."}], "stream": True,
                "temperature": 0, "max_tokens": 900, "ignore_eos": True,
            }  # fmt: skip
            got = 0
            async with client.stream("POST", "/v1/chat/completions", json=payload) as r:
                async for line in r.aiter_lines():
                    got += line.startswith("data: ")
                    if got >= 5:
                        break  # closing the response disconnects
            return got

        results = await asyncio.gather(leave(), *(stream_chat(client, q) for q in QUESTIONS[1:]))
    assert results[0] == 5
    assert [r[0] for r in results[1:]] == [a[0] for a in alone]  # type: ignore[index]
    wait_until(
        lambda: cluster.worker_metric("unimodel_worker_generations_total", finish_reason="abort") == aborted_before + 1,
        30, "the worker to count the abort",
    )  # fmt: skip


def test_min_tokens_and_ignore_eos_fix_the_length_on_chat_and_completions(cluster: Cluster) -> None:
    with httpx.Client(base_url=cluster.url, timeout=120) as client:
        short = client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "temperature": 0, "max_tokens": 48},
        ).json()
        assert short["choices"][0]["finish_reason"] == "stop" and short["usage"]["completion_tokens"] < 30
        fixed = client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "temperature": 0, "max_tokens": 48, "ignore_eos": True},
        ).json()
        assert fixed["choices"][0]["finish_reason"] == "length" and fixed["usage"]["completion_tokens"] == 48
        held = client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "temperature": 0, "max_tokens": 48, "min_tokens": 40},
        ).json()
        assert held["usage"]["completion_tokens"] >= 40
        assert held["choices"][0]["message"]["content"].startswith(short["choices"][0]["message"]["content"])
        completion = client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 32, "ignore_eos": True}
        ).json()
        assert completion["choices"][0]["finish_reason"] == "length" and completion["usage"]["completion_tokens"] == 32
        with client.stream(
            "POST", "/v1/completions",
            json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 24, "min_tokens": 24, "stream": True,
                  "stream_options": {"include_usage": True}},
        ) as r:  # fmt: skip
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    assert [c["usage"]["completion_tokens"] for c in chunks if c.get("usage")] == [24]

