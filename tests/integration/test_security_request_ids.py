"""Issue 15, request identity, on a real cluster (nats-server, etcd, router, batcher, a gpu-worker running
SmolLM2-135M-Instruct on llama.cpp, a gateway): the request id is the gateway's own, a client's x-request-id
is only echoed, aborts are scoped to the gateway that owns the generation, and a refused generation
broadcasts no abort, so one client cannot stall or stop another's chat."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from helpers.support import Infra, Services, metric_total
from unimodel.core import subjects
from unimodel.local.procs import free_port, http_ok, wait_until
from unimodel.v1 import generate_pb2, inference_pb2

MODEL = "smollm2-135m-instruct"
pytestmark = pytest.mark.timeout(300)
NO_CACHE = {"x-unimodel-cache": "off"}


class Cluster:
    def __init__(self, infra: Infra, services: Services, metrics_port: int) -> None:
        self.infra, self.services, self.metrics_port = infra, services, metrics_port
        self.url = services.url

    def aborted(self) -> float:
        """The worker's generations that ended aborted (Prometheus text format)."""
        return metric_total(f"http://127.0.0.1:{self.metrics_port}/metrics", "unimodel_worker_generations_total", finish_reason="abort")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_repository: Path) -> Iterator[Cluster]:
    infra = Infra(tmp_path_factory.mktemp("rid"))
    services = Services(infra)
    try:
        infra.start()
        metrics_port = free_port()
        services.start("router")
        services.start("batcher")
        services.start("gpu-worker", "--instance-id", "worker-0", "--metrics-port", str(metrics_port), name="worker-0")
        services.http_port, services.grpc_port = free_port(), free_port()
        gw = services.start(
            "gateway", "--http-port", str(services.http_port), "--grpc-port", str(services.grpc_port),
            "--model-repository", str(model_repository), "--load-models", MODEL,
        )
        wait_until(lambda: http_ok(f"{services.url}/health/ready"), 60, "gateway ready", gw)
        services.wait_models([MODEL])
        yield Cluster(infra, services, metrics_port)
    finally:
        services.stop()
        infra.stop()


def counting(max_tokens: int, stream: bool = False) -> dict[str, object]:
    """A chat that goes on until max_tokens (greedy, end of sequence ignored)."""
    return {
        "model": MODEL, "messages": [{"role": "user", "content": "Count: 1, 2, 3, 4, 5,"}], "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": True, "stream": stream,
    }


TOO_LONG = {"model": MODEL, "messages": [{"role": "user", "content": "hello " * 2500}], "max_tokens": 4}
"""Refused by the worker: its prompt is over the model's max_prompt_tokens (1536)."""


async def test_finding_a_client_request_id_is_echoed_but_the_request_id_is_ours(cluster: Cluster) -> None:
    nc = await nats.connect(cluster.infra.nats.url)
    items: list[inference_pb2.BatchItem] = []

    async def on_item(msg: nats.aio.msg.Msg) -> None:
        items.append(inference_pb2.BatchItem.FromString(msg.data))

    try:
        await nc.subscribe(subjects.batch(MODEL), cb=on_item)  # a copy of what the batcher takes
        await nc.flush()
        async with httpx.AsyncClient(timeout=60) as http:
            r = await http.post(
                f"{cluster.url}/v1/chat/completions", json=counting(3), headers={**NO_CACHE, "x-request-id": "victim-1"}
            )
        assert r.status_code == 200, r.text
        await nc.flush()
    finally:
        await nc.close()
    ours = r.headers["x-unimodel-request-id"]
    assert r.headers["x-request-id"] == "victim-1" and len(ours) == 32 and ours != "victim-1"
    assert r.json()["id"] == f"chatcmpl-{ours}"  # OpenAI's id is ours too
    (sent,) = items
    assert sent.request_id == ours  # the key the workers know the request by


async def test_finding_an_abort_from_another_gateway_or_with_a_guessed_id_does_not_stop_a_generation(
    cluster: Cluster,
) -> None:
    nc = await nats.connect(cluster.infra.nats.url)
    try:
        async with httpx.AsyncClient(timeout=60) as http:
            # 1. aborts by another gateway, naming no gateway, or with guessed ids: the generation goes on
            async with http.stream(
                "POST", f"{cluster.url}/v1/chat/completions", json=counting(60, stream=True), headers=NO_CACHE
            ) as r:
                assert r.status_code == 200
                ours, gateway = r.headers["x-request-id"], r.headers["x-unimodel-path"].split(",")[0]
                events = aiter_events(r)
                await anext(events)
                await anext(events)  # it streams
                guesses = [ours[:16] + f"{int(ours[16:], 16) + d:016x}" for d in (1, 2, -1)]  # the old ids' shape
                for abort in (
                    generate_pb2.AbortRequest(request_ids=[ours], gateway_id="gateway-other", reason="forged"),
                    generate_pb2.AbortRequest(request_ids=[ours], reason="forged"),
                    generate_pb2.AbortRequest(request_ids=guesses, gateway_id=gateway, reason="guessed"),
                ):
                    await nc.publish(subjects.ABORT, abort.SerializeToString())
                await nc.flush()
                rest = [event async for event in events]
            finishes = [c["finish_reason"] for e in rest if "choices" in e for c in e["choices"] if c["finish_reason"]]
            assert finishes == ["length"] and not any("error" in e for e in rest), rest[-3:]
            # 2. its own gateway's abort (what a client that leaves causes) does stop it
            before = cluster.aborted()
            async with http.stream(
                "POST", f"{cluster.url}/v1/chat/completions", json=counting(400, stream=True), headers=NO_CACHE
            ) as r:
                ours, gateway = r.headers["x-request-id"], r.headers["x-unimodel-path"].split(",")[0]
                events = aiter_events(r)
                await anext(events)
                own = generate_pb2.AbortRequest(request_ids=[ours], gateway_id=gateway, reason="test")
                await nc.publish(subjects.ABORT, own.SerializeToString())
                rest = [event async for event in events]
            assert "error" in rest[-1] and rest[-1]["error"]["code"] == "cancelled", rest[-1]
            wait_until(lambda: cluster.aborted() > before, 10, "the worker counts the aborted generation")
    finally:
        await nc.close()


async def test_finding_a_refused_generation_broadcasts_no_abort(cluster: Cluster) -> None:
    nc = await nats.connect(cluster.infra.nats.url)
    aborts: list[generate_pb2.AbortRequest] = []

    async def on_abort(msg: nats.aio.msg.Msg) -> None:
        aborts.append(generate_pb2.AbortRequest.FromString(msg.data))

    try:
        await nc.subscribe(subjects.ABORT, cb=on_abort)
        await nc.flush()
        async with httpx.AsyncClient(timeout=60) as http:
            for stream in (False, True):
                r = await http.post(
                    f"{cluster.url}/v1/chat/completions", json={**TOO_LONG, "stream": stream}, headers=NO_CACHE
                )
                assert r.status_code == 400 and "max_prompt_tokens" in r.text, r.text  # the worker refused it
            r = await http.post(f"{cluster.url}/v1/chat/completions", json={**TOO_LONG, "model": "nope"}, headers=NO_CACHE)
            assert r.status_code == 404
        await asyncio.sleep(0.5)
        await nc.flush()
    finally:
        await nc.close()
    assert aborts == []


async def test_finding_a_client_request_id_reused_after_an_abort_is_served(cluster: Cluster) -> None:
    headers = {**NO_CACHE, "x-request-id": "victim-7"}
    url = f"{cluster.url}/v1/chat/completions"
    async with httpx.AsyncClient(timeout=30) as http:
        # another client's refused request and one that leaves mid-stream, both with the victim's id
        r = await http.post(url, json=TOO_LONG, headers=headers)
        assert r.status_code == 400
        async with http.stream("POST", url, json=counting(400, stream=True), headers=headers) as r:
            assert r.status_code == 200
            await anext(aiter_events(r))
        # the victim's own request with that id is served at once (it used to be dropped for 5 min)
        for _ in range(2):
            r = await http.post(url, json=counting(5), headers=headers)
            assert r.status_code == 200 and r.headers["x-request-id"] == "victim-7", r.text
            assert r.json()["choices"][0]["finish_reason"] == "length"


async def aiter_events(r: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The data events of an SSE stream, decoded ([DONE] left out)."""
    async for line in r.aiter_lines():
        if line.startswith("data: {"):
            yield json.loads(line[len("data: "):])
