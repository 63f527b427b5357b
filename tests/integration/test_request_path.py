"""A real echo request over real NATS and etcd, across gateway -> batcher -> worker (the router places models
and publishes the routing table the batcher dispatches from)."""

from __future__ import annotations

import concurrent.futures
import functools

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from helpers.support import Services, etcd_instances, router_view
from unimodel.core.values import from_value, to_value
from unimodel.v1 import errors_pb2, inference_pb2, services_pb2_grpc


@pytest.fixture
def cluster(services: Services) -> Services:
    services.start_cluster(workers=1, all_six=True)
    return services


def test_echo_crosses_every_hop_over_http(cluster: Services) -> None:
    value = {"text": "hello", "numbers": [1, 2.5, -3], "nested": {"ok": True, "none": None}}
    r = cluster.predict(value)
    assert r.status_code == 200, r.text
    assert r.json() == {"model": "echo", "output": value}
    path = r.headers["x-unimodel-path"].split(",")
    assert [hop.rsplit("-", 1)[0] for hop in path] == ["gateway", "batcher", "worker"]
    assert r.headers["x-unimodel-worker"] == path[-1] == "worker-0"
    assert r.headers["x-request-id"]


def test_models_and_readiness(cluster: Services) -> None:
    import httpx

    models = httpx.get(f"{cluster.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["echo"]
    ready = httpx.get(f"{cluster.url}/health/ready")
    assert ready.status_code == 200 and all(ready.json()["checks"].values())


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(cluster: Services) -> None:
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda i: cluster.predict({"i": i}), range(200)))
    assert [r.json()["output"] for r in responses] == [{"i": i} for i in range(200)]


def test_echo_over_grpc_with_health_and_reflection(cluster: Services) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{cluster.grpc_port}") as channel:
        stub = services_pb2_grpc.InferenceServiceStub(channel)
        reply, call = stub.Predict.with_call(
            inference_pb2.PredictRequest(model="echo", input=to_value([1, "two"])),
            metadata=(("x-request-id", "abc123"),),
            timeout=10,
        )
        assert from_value(reply.output) == [1, "two"]
        assert [hop.rsplit("-", 1)[0] for hop in reply.path] == ["gateway", "batcher", "worker"]
        assert ("x-request-id", "abc123") in tuple(call.trailing_metadata())

        models = stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5)
        assert [m.name for m in models.models] == ["echo"] and models.models[0].ready

        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(inference_pb2.PredictRequest(model="missing"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "missing" in info.value.details()
        detail = _error_detail(info.value)
        assert detail.code == errors_pb2.NOT_FOUND and detail.metadata["model"] == "missing"

        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "unimodel.v1.InferenceService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in next(answers).list_services_response.service}
        assert {"unimodel.v1.InferenceService", "grpc.health.v1.Health"} <= names


def test_router_exposes_its_view_over_grpc(cluster: Services) -> None:
    assert router_view(cluster.infra) == {"worker-0"}
    kinds = sorted(info.kind for info in etcd_instances(cluster.infra).values())
    assert kinds == sorted(["gateway", "router", "batcher", "cache", "embedding-worker", "gpu-worker"])


def _error_detail(err: grpc.RpcError) -> errors_pb2.ErrorDetail:
    from google.rpc import status_pb2

    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            detail = errors_pb2.ErrorDetail()
            status.details[0].Unpack(detail)
            return detail
    raise AssertionError("no grpc-status-details-bin trailer")


async def test_request_id_deadline_and_trace_context_cross_every_hop(cluster: Services) -> None:
    import asyncio

    import httpx
    import nats

    from unimodel.core.subjects import Header

    seen: dict[str, list[nats.aio.msg.Msg]] = {"batch": [], "route": [], "worker": []}
    nc = await nats.connect(cluster.infra.nats.url)
    try:
        # Plain subscribers get a copy of every message (the services use queue groups / direct subjects).
        for hop, subject in (("batch", "unimodel.v1.batch.*"), ("route", "unimodel.v1.route.*"), ("worker", "unimodel.v1.worker.*.infer")):
            await nc.subscribe(subject, cb=functools.partial(_append, seen[hop]))
        await nc.flush()
        traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        async with httpx.AsyncClient() as client:
            r = await client.post(
                f"{cluster.url}/v1/models/echo:predict",
                json={"input": "traced"},
                headers={"traceparent": traceparent, "x-request-id": "req-42"},
            )
        assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
        for _ in range(50):
            if seen["batch"] and seen["worker"]:
                break
            await asyncio.sleep(0.05)
    finally:
        await nc.close()

    # gateway -> batcher: request id and deadline travel in the item (no headers to encode and parse);
    # the trace context too, and in headers so the batch message carries it on.
    (batch_msg,) = seen["batch"]
    sent = inference_pb2.BatchItem.FromString(batch_msg.data)
    ours = r.headers["x-unimodel-request-id"]  # the client's x-request-id is echoed, never used inside
    assert sent.request_id == ours != "req-42" and sent.deadline_unix_ms > 0
    assert sent.trace_context["traceparent"] == traceparent
    assert batch_msg.headers[Header.TRACEPARENT] == traceparent
    assert sent.reply_to == batch_msg.reply and sent.reply_group.endswith(".batch")
    assert seen["route"] == []  # the batcher sends the batch straight to the worker, from the routing table
    (msg,) = seen["worker"]
    assert msg.headers[Header.TRACEPARENT] == traceparent
    assert int(msg.headers[Header.DEADLINE]) >= sent.deadline_unix_ms
    item = inference_pb2.BatchRequest.FromString(msg.data).items[0]
    assert item.request_id == ours
    assert item.trace_context["traceparent"] == traceparent
    assert item.deadline_unix_ms == sent.deadline_unix_ms
    assert item.reply_to == batch_msg.reply and item.reply_group == sent.reply_group


async def _append(out: list[object], msg: object) -> None:
    out.append(msg)


async def test_a_batch_answers_each_gateway_with_one_reply_batch(cluster: Services) -> None:
    """The worker answers the items of a batch that came from one gateway in one ReplyBatch message
    (BatchItem.reply_group), and every request still gets its own answer."""
    import asyncio

    import httpx
    import nats

    batches: list[inference_pb2.ReplyBatch] = []
    nc = await nats.connect(cluster.infra.nats.url)

    async def on_batch(msg: nats.aio.msg.Msg) -> None:
        batches.append(inference_pb2.ReplyBatch.FromString(msg.data))

    try:
        await nc.subscribe("unimodel.v1.reply.*.batch", cb=on_batch)
        await nc.flush()
        async with httpx.AsyncClient(timeout=30) as client:
            responses = await asyncio.gather(
                *(client.post(f"{cluster.url}/v1/models/echo:predict", json={"input": i}) for i in range(32))
            )
        await asyncio.sleep(0.2)
    finally:
        await nc.close()
    assert [r.json()["output"] for r in responses] == list(range(32))
    answers = [reply for batch in batches for reply in batch.replies]
    assert len(answers) == 32 and len({a.reply_to for a in answers}) == 32
    assert all(a.WhichOneof("result") == "response" for a in answers)
    assert len(batches) < 32  # several answers per message
