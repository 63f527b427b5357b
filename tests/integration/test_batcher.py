"""The real batcher process on real nats-server and etcd, between a caller and a router peer.

The test plays the gateway (it publishes BatchItems with nats-py, as the gateway does) and the router
(a queue-group subscriber on the route subjects that records each BatchRequest, answers every item at its
reply_to and acknowledges the batch with a BatchAck, as router + worker do). Batching policies come from
ModelConfigs registered in etcd, where the gateway puts them.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable

import httpx
import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from helpers.support import Infra, Services
from unimodel.core import errors, modelconfig, subjects
from unimodel.core.bus import raise_for_error_headers
from unimodel.core.membership import model_key
from unimodel.core.store import EtcdStore
from unimodel.core.subjects import Header
from unimodel.core.values import to_value
from unimodel.local.procs import free_port
from unimodel.v1 import inference_pb2, model_pb2

PREFIX = "/unimodel/v1"


def config(name: str, max_batch_size: int, **batching: object) -> model_pb2.ModelConfig:
    return modelconfig.parse(
        {
            "name": name,
            "engine": "echo",
            "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
            "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}],
            "max_batch_size": max_batch_size,
            "batching": batching,
        }
    )


# hold_when_idle: the window applies to the first request too, so requests wait in the batcher for these tests
MODELS = [
    config("grouped", 4, max_queue_delay_ms=800, hold_when_idle=True),
    config("small-queue", 8, max_queue_delay_ms=1500, max_queue_size=3, hold_when_idle=True),
    config("timeouts", 8, max_queue_delay_ms=1500, default_timeout_ms=250, hold_when_idle=True),
    config("unbatched", 0, max_queue_delay_ms=2000),  # ignored: the model does not batch
]


class RouterPeer:
    """Stands where the router is: records batches, answers each item at its inbox, acks the batch."""

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self.batches: list[tuple[float, inference_pb2.BatchRequest]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.nc.subscribe(subjects.ROUTE_ALL, queue=subjects.QUEUE_ROUTER, cb=self._on_batch)
        await self.nc.flush()

    async def _on_batch(self, msg: Msg) -> None:
        task = asyncio.create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Msg) -> None:
        batch = inference_pb2.BatchRequest.FromString(msg.data)
        self.batches.append((time.monotonic(), batch))
        for item in batch.items:
            reply = inference_pb2.PredictResponse(model=batch.model, output=item.input, worker_id="peer", path=batch.path)
            await self.nc.publish(item.reply_to, reply.SerializeToString())
        ack = inference_pb2.BatchAck(batch_id=batch.batch_id, worker_id="peer", succeeded=len(batch.items))
        await msg.respond(ack.SerializeToString())

    def of(self, model: str) -> list[list[str]]:
        """Request ids per batch of `model`, in dispatch order."""
        return [[i.request_id for i in b.items] for _, b in self.batches if b.model == model]


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def register(infra: Infra, *configs: model_pb2.ModelConfig) -> None:
    store = EtcdStore([("127.0.0.1", infra.etcd.port)], auth=infra.etcd_auth)
    try:
        for c in configs:
            await store.put(model_key(PREFIX, c.name).encode(), c.SerializeToString())
    finally:
        await store.close()


class Caller:
    """Plays the gateway: one BatchItem per request on the model's batch subject."""

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc

    async def send(
        self,
        model: str,
        request_id: str,
        *,
        rows: int = 0,
        timeout_s: float = 10.0,
        header_deadline_s: float | None = 10.0,
        item_deadline_s: float | None = None,
        id_in_item: bool = True,
        traceparent: str = "",
    ) -> tuple[inference_pb2.PredictResponse | errors.UnimodelError, float]:
        """The worker's answer or the error the caller got, and the seconds it took."""
        now_ms = int(time.time() * 1000)
        item = inference_pb2.BatchItem(request_id=request_id if id_in_item else "", input=to_value(request_id), rows=rows)
        if item_deadline_s is not None:
            item.deadline_unix_ms = now_ms + int(item_deadline_s * 1000)
        headers = {Header.REQUEST_ID: request_id}
        if header_deadline_s is not None:
            headers[Header.DEADLINE] = str(now_ms + int(header_deadline_s * 1000))
        if traceparent:
            headers[Header.TRACEPARENT] = traceparent
        started = time.monotonic()
        msg = await self.nc.request(subjects.batch(model), item.SerializeToString(), timeout=timeout_s, headers=headers)
        took = time.monotonic() - started
        try:
            raise_for_error_headers(msg)
        except errors.UnimodelError as exc:
            return exc, took
        return inference_pb2.PredictResponse.FromString(msg.data), took


@pytest.fixture
async def batcher(services: Services) -> AsyncIterator[tuple[Services, int]]:
    await register(services.infra, *MODELS)
    metrics_port = free_port()
    instance = f"batcher-{uuid.uuid4().hex[:6]}"
    services.start(
        "batcher", "--instance-id", instance, "--metrics-port", str(metrics_port), "--max-inflight-batches", "2",
        "--max-queue-delay-ms", "0",
    )
    log = services.infra.sink
    await until(lambda: f"{instance} ready" in log.getvalue(), 30, "batcher ready")
    for c in MODELS:
        await until(lambda c=c: f"model {c.name}: max_batch_size" in log.getvalue(), 10, f"config of {c.name}")
    yield services, metrics_port


@pytest.fixture
async def peers(batcher: tuple[Services, int]) -> AsyncIterator[tuple[Caller, RouterPeer]]:
    services, _ = batcher
    nc = await nats.connect(services.infra.nats.url)
    router = RouterPeer(nc)
    await router.start()
    try:
        yield Caller(nc), router
    finally:
        await nc.close()


async def test_batches_follow_the_registered_config_and_its_changes(
    batcher: tuple[Services, int], peers: tuple[Caller, RouterPeer]
) -> None:
    services, _ = batcher
    caller, router = peers
    results = await asyncio.gather(*(caller.send("grouped", f"g{i}") for i in range(10)))
    for i, (answer, _took) in enumerate(results):
        assert isinstance(answer, inference_pb2.PredictResponse), answer
        assert answer.output.string_value == f"g{i}"  # each caller got its own answer
        assert answer.path[0].startswith("batcher-")
    sizes = sorted(len(b) for b in router.of("grouped"))
    assert sizes == [2, 4, 4]  # max_batch_size 4; the last two leave when the 800 ms window closes
    took = sorted(t for _, t in results)
    assert took[-1] >= 0.75 and took[7] < 0.6

    # rows, not requests: two-row requests fill a batch of 4 rows two at a time
    results = await asyncio.gather(*(caller.send("grouped", f"r{i}", rows=2) for i in range(4)))
    assert all(isinstance(a, inference_pb2.PredictResponse) for a, _ in results)
    assert sorted(len(b) for b in router.of("grouped")[3:]) == [2, 2]
    answer, _ = await caller.send("grouped", "too-big", rows=5)
    assert isinstance(answer, errors.InvalidArgument) and "max_batch_size 4" in answer.message

    # a config change applies to the next batch
    await register(services.infra, config("grouped", 2, max_queue_delay_ms=800, hold_when_idle=True))
    await until(lambda: "model grouped: max_batch_size 2" in services.infra.sink.getvalue(), 10, "config change")
    before = len(router.of("grouped"))
    results = await asyncio.gather(*(caller.send("grouped", f"c{i}") for i in range(4)))
    assert all(isinstance(a, inference_pb2.PredictResponse) for a, _ in results)
    assert [len(b) for b in router.of("grouped")[before:]] == [2, 2]


async def test_a_model_that_does_not_batch_and_an_unregistered_one(peers: tuple[Caller, RouterPeer]) -> None:
    caller, router = peers
    results = await asyncio.gather(*(caller.send("unbatched", f"u{i}", rows=3) for i in range(5)))
    assert all(isinstance(a, inference_pb2.PredictResponse) for a, _ in results)
    assert sorted(router.of("unbatched")) == [[f"u{i}"] for i in range(5)]  # one request per batch, no waiting
    assert max(t for _, t in results) < 1.0

    results = await asyncio.gather(*(caller.send("echo", f"e{i}") for i in range(40)))
    assert [a.output.string_value for a, _ in results] == [f"e{i}" for i in range(40)]  # type: ignore[union-attr]  # the echo requests all succeed: each answer is a PredictResponse
    assert all(len(b) <= 32 for b in router.of("echo"))  # the batcher's default max_batch_size


async def test_the_item_reaches_the_router_with_reply_to_deadline_request_id_and_trace(
    peers: tuple[Caller, RouterPeer],
) -> None:
    caller, router = peers
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    before_ms = int(time.time() * 1000)
    answer, _ = await caller.send("echo", "from-headers", id_in_item=False, traceparent=traceparent, header_deadline_s=7)
    assert isinstance(answer, inference_pb2.PredictResponse)
    answer, _ = await caller.send("echo", "in-item", item_deadline_s=9)
    assert isinstance(answer, inference_pb2.PredictResponse)
    first, second = (b.items[0] for _, b in router.batches if b.model == "echo")
    # fields the item lacked come from the request's headers; the inbox is the caller's
    assert first.request_id == "from-headers" and first.reply_to.startswith("_INBOX.")
    assert dict(first.trace_context) == {"traceparent": traceparent}
    assert before_ms + 6_900 <= first.deadline_unix_ms <= before_ms + 7_500
    assert first.input.string_value == "from-headers"
    # fields the item carries are kept as sent
    assert second.request_id == "in-item" and not second.trace_context
    assert before_ms + 8_900 <= second.deadline_unix_ms <= before_ms + 9_500
    assert [b.path for _, b in router.batches if b.model == "echo"][0][0].startswith("batcher-")


async def test_overflow_is_resource_exhausted_with_retry_after(
    batcher: tuple[Services, int], peers: tuple[Caller, RouterPeer]
) -> None:
    _, metrics_port = batcher
    caller, router = peers
    queued = [asyncio.create_task(caller.send("small-queue", f"q{i}")) for i in range(3)]
    await asyncio.sleep(0.2)  # the three wait for the 1.5 s window (max_queue_size 3)
    over = await asyncio.gather(*(caller.send("small-queue", f"x{i}") for i in range(2)))
    for answer, took in over:
        assert isinstance(answer, errors.ResourceExhausted), answer
        assert answer.http_status == 429 and answer.retry_after_s > 0
        assert "full" in answer.message and took < 0.5  # answered at once, not after the window
    results = await asyncio.gather(*queued)
    assert all(isinstance(a, inference_pb2.PredictResponse) for a, _ in results)
    assert router.of("small-queue") == [["q0", "q1", "q2"]]

    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    assert _sample(text, "unimodel_batcher_rejected_requests_total", model="small-queue", reason="queue_full") == 2
    assert _sample(text, "unimodel_batcher_batch_rows_count", model="small-queue") == 1
    assert _sample(text, "unimodel_batcher_batch_rows_sum", model="small-queue") == 3
    assert _sample(text, "unimodel_batcher_batch_fill_ratio_sum", model="small-queue") == pytest.approx(3 / 8)
    assert _sample(text, "unimodel_batcher_queue_wait_seconds_count", model="small-queue") == 3
    assert _sample(text, "unimodel_batcher_queue_depth", model="small-queue") == 0


async def test_requests_expire_while_queued_and_are_answered_when_they_expire(
    batcher: tuple[Services, int], peers: tuple[Caller, RouterPeer]
) -> None:
    _, metrics_port = batcher
    caller, router = peers
    # "timeouts" holds a batch open for 1.5 s; its queue timeout for requests without a deadline is 250 ms
    no_deadline = asyncio.create_task(caller.send("timeouts", "queue-timeout", header_deadline_s=None))
    header = asyncio.create_task(caller.send("timeouts", "header-deadline", header_deadline_s=0.4))
    in_item = asyncio.create_task(caller.send("timeouts", "item-deadline", item_deadline_s=0.55))
    patient = asyncio.create_task(caller.send("timeouts", "patient", item_deadline_s=10))
    for task, expected in ((no_deadline, 0.25), (header, 0.4), (in_item, 0.55)):
        answer, took = await task
        assert isinstance(answer, errors.DeadlineExceeded), answer
        assert "while queued" in answer.message
        assert expected - 0.05 <= took <= expected + 0.5  # at its deadline, long before the 1.5 s window closes
    answer, took = await patient
    assert isinstance(answer, inference_pb2.PredictResponse) and took >= 1.4
    assert router.of("timeouts") == [["patient"]]  # expired work never reached the router
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    assert _sample(text, "unimodel_batcher_rejected_requests_total", model="timeouts", reason="expired") == 3


def _sample(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name and ",".join(sorted((m.group(2) or "").split(","))) == want:
            return float(m.group(3))
    raise AssertionError(f"no sample {name}{{{want}}}")
