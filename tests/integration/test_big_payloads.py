"""Big payloads against real servers (issue 16): nats-server configured with UniModel's max_payload, router,
batcher, a gpu-worker with the built-in echo model and the gateway, as subprocesses.

- A 60 MB :predict (64 MiB nats-server, the default) comes back whole, and while it is in flight /health/live
  and small predicts keep answering: their p99s are printed; the bound asserted is loose (the figures belong
  to scripts/bench/big_payloads.py, docs/benchmarks.md).
- With a 1 MiB nats-server (its own default), requests bigger than the bus carries are 413 naming the limit on
  every route (unified :predict, KServe v2 HTTP and gRPC), never a 5xx; the gateway stays healthy; requests
  that fit, sent at the same time, succeed, also when together they would not fit one message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from helpers.support import Infra, Services

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
SMALL_BUS = MIB
SMALL_BUS_LIMIT = SMALL_BUS - 64 * 1024  # core/payload_limits.py message_limit: max_payload less the envelope


def _cluster(tmp: Path, max_payload: int) -> tuple[Infra, Services]:
    infra = Infra(tmp, max_payload=max_payload)
    services = Services(infra, lease_ttl_s=10)  # a worker busy with 60 MB must not lose its lease on a loaded host
    infra.start()
    services.start_cluster(workers=1, all_six=False)
    for _ in range(100):  # the echo model is up once a predict answers
        if services.predict("warm").status_code == 200:
            break
        time.sleep(0.2)
    return infra, services


@pytest.fixture(scope="module")
def big_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    infra, services = None, None
    try:
        infra, services = _cluster(tmp_path_factory.mktemp("big"), 64 * MIB)
        yield services
    finally:
        if services is not None:
            services.stop()
        if infra is not None:
            infra.stop()


@pytest.fixture(scope="module")
def small_bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    infra, services = None, None
    try:
        infra, services = _cluster(tmp_path_factory.mktemp("smallbus"), SMALL_BUS)
        yield services
    finally:
        if services is not None:
            services.stop()
        if infra is not None:
            infra.stop()


def _p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(0.99 * len(values)))] if values else 0.0


# The big request goes from its own process: its upload and download do not hold up the probes' event loop here.
SEND_BIG = """
import sys, httpx
text = "a" * 60_000_000
r = httpx.post(sys.argv[1], content=b'{"input":"' + text.encode() + b'"}', timeout=120)
same = r.status_code == 200 and r.json()["output"] == text
print(r.status_code, "same" if same else r.text[:300])
"""


def test_a_60_mb_predict_succeeds_while_health_and_small_predicts_keep_answering(big_cluster: Services) -> None:
    base = big_cluster.url

    def send_big() -> str:
        done = subprocess.run(
            [sys.executable, "-c", SEND_BIG, f"{base}/v1/models/echo:predict"], capture_output=True, text=True, timeout=180
        )
        return done.stdout.strip() or done.stderr[-500:]

    live: list[float] = []
    small: list[float] = []
    statuses: list[int] = []

    async def probe(done: concurrent.futures.Future[str]) -> None:
        async with httpx.AsyncClient(timeout=60) as a, httpx.AsyncClient(timeout=60) as b:

            async def lives() -> None:
                while not done.done():
                    t0 = time.perf_counter()
                    r = await a.get(f"{base}/health/live")
                    live.append((time.perf_counter() - t0) * 1000)
                    statuses.append(r.status_code)
                    await asyncio.sleep(0.01)

            async def smalls() -> None:
                while not done.done():
                    t0 = time.perf_counter()
                    r = await b.post(f"{base}/v1/models/echo:predict", json={"input": "ping"})
                    small.append((time.perf_counter() - t0) * 1000)
                    statuses.append(r.status_code)

            await asyncio.gather(lives(), smalls())

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = time.perf_counter()
        big = pool.submit(send_big)
        asyncio.run(probe(big))
        outcome = big.result()
        elapsed = time.perf_counter() - started
    print(
        f"\n60 MB predict: {outcome} in {elapsed:.1f} s; /health/live p99 {_p99(live):.1f} ms (n={len(live)}), "
        f"small predict p99 {_p99(small):.1f} ms (n={len(small)})"
    )
    assert outcome == "200 same"  # the whole 60 MB came back
    assert set(statuses) == {200}
    assert live and small
    assert _p99(live) < 500  # loose: the figures are the benchmark's; 2.24 s before (issue 16)
    gateway = next(p for p in big_cluster.procs if p.name == "gateway")
    assert not _spool_files(gateway.pid)  # the files that held the body and answer (gateway/spool.py) are gone


def _spool_files(pid: int | None, wait_s: float = 5.0) -> list[str]:
    """The gateway's body files left in /dev/shm or the temporary directory, once its threads had `wait_s` to
    unlink them."""
    deadline = time.monotonic() + wait_s
    while True:
        left = [n for d in ("/dev/shm", tempfile.gettempdir()) for n in os.listdir(d) if n.startswith(f"unimodel-{pid}-")]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def test_a_big_kserve_infer_goes_through_the_helpers_as_tritonclient_sends_it(big_cluster: Services) -> None:
    """KServe v2 REST infer with a 24 MB binary tensor (tritonclient.http, binary in and out, and gzip-compressed):
    spooled, parsed, checked and rendered in the helper processes, the item and answer by reference; the answer
    is the tensor, the model's statistics count it with its batch's times, and a bad shape is a 400 naming it."""
    client = httpclient.InferenceServerClient(f"127.0.0.1:{big_cluster.http_port}", network_timeout=120, connection_timeout=120)
    data = np.random.default_rng(7).random((1, 6_000_000), dtype=np.float32)
    before = client.get_inference_statistics("echo")["model_stats"][0]["inference_stats"]["success"]["count"]
    for compression in (None, "gzip"):
        inp = httpclient.InferInput("INPUT0", list(data.shape), "FP32")
        inp.set_data_from_numpy(data, binary_data=True)
        out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)
        result = client.infer("echo", [inp], outputs=[out], request_compression_algorithm=compression, request_id=f"big-{compression}")
        assert np.array_equal(result.as_numpy("OUTPUT0"), data)
        assert result.get_response()["id"] == f"big-{compression}"
    stats = client.get_inference_statistics("echo")["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] == before + 2
    assert stats["inference_stats"]["compute_infer"]["ns"] > 0  # the worker's times came back from the helper

    wrong = np.zeros((1, 2, 2_000_000), np.float32)  # echo's INPUT0 is [-1] after the batch dimension
    inp = httpclient.InferInput("INPUT0", list(wrong.shape), "FP32")
    inp.set_data_from_numpy(wrong, binary_data=True)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("echo", [inp])
    assert "INPUT0" in caught.value.message() and caught.value.status() == "400"
    assert httpx.get(f"{big_cluster.url}/health/live", timeout=5).status_code == 200


def test_over_the_bus_limit_is_413_naming_it_and_what_fits_at_the_same_time_succeeds(small_bus: Services) -> None:
    base = small_bus.url
    big = "b" * (2 * MIB)
    fits = ["c" * 600_000, "d" * 600_000, "e" * 600_000, "f", "g"]  # together > 1 MiB: cut into several messages

    async def together() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            calls = [client.post(f"{base}/v1/models/echo:predict", json={"input": v}) for v in [big, *fits]]
            return list(await asyncio.gather(*calls))

    answers = asyncio.run(together())
    refused, *others = answers
    assert refused.status_code == 413, refused.text[:300]
    error = refused.json()["error"]
    assert error["code"] == "PAYLOAD_TOO_LARGE" and f"{SMALL_BUS_LIMIT} bytes" in error["message"]
    assert "retry-after" not in refused.headers
    for value, answer in zip(fits, others, strict=True):
        assert answer.status_code == 200, answer.text[:300]
        assert answer.json()["output"] == value
    assert httpx.get(f"{base}/health/live", timeout=5).status_code == 200
    assert small_bus.predict("still here").status_code == 200


def test_kserve_http_and_grpc_over_the_bus_limit_are_refused_naming_it(small_bus: Services) -> None:
    data = np.zeros((1, 400_000), np.float32)  # 1.6 MB of tensor contents
    doc = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": list(data.shape), "data": data.ravel().tolist()}]}
    r = httpx.post(f"{small_bus.url}/v2/models/echo/infer", json=doc, timeout=60)
    assert r.status_code == 413, r.text[:300]
    assert f"{SMALL_BUS_LIMIT} bytes" in r.json()["error"]

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{small_bus.grpc_port}")
    inp = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
    inp.set_data_from_numpy(data)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("echo", [inp], client_timeout=60)
    assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert f"{SMALL_BUS_LIMIT} bytes" in caught.value.message()
    small = np.ones((1, 4), np.float32)  # the same route still answers what fits
    inp = grpcclient.InferInput("INPUT0", list(small.shape), "FP32")
    inp.set_data_from_numpy(small)
    assert np.array_equal(client.infer("echo", [inp], client_timeout=30).as_numpy("OUTPUT0"), small)


def test_a_body_over_the_gateways_limit_is_413_before_it_is_read(small_bus: Services) -> None:
    """Content-Length over max_body_bytes (64 MiB): 413 at once, JSON naming the limit, nothing read."""
    with socket.create_connection(("127.0.0.1", small_bus.http_port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/models/echo:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 70000000\r\n\r\n"
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b"PAYLOAD_TOO_LARGE" in body and str(64 * MIB).encode() in body
