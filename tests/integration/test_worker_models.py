"""A real gpu-worker process: load a tiny ONNX model by a ModelCommand over NATS, run batches sent
straight to its infer subject (answers at each item's inbox), watch its registration in etcd."""

from __future__ import annotations

import asyncio
import importlib.util
import time
from pathlib import Path

import grpc
import nats
import numpy as np
import onnx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper, numpy_helper

from helpers.support import Infra, Services
from unimodel.core import modelconfig, subjects
from unimodel.core.bus import raise_for_error_headers
from unimodel.core.errors import InvalidArgument, NotFound, UnimodelError
from unimodel.core.membership import instance_key
from unimodel.core.store import EtcdStore
from unimodel.core.tensors import from_numpy, to_numpy
from unimodel.core.values import from_value, to_value
from unimodel.v1 import inference_pb2, model_pb2, registry_pb2

S = registry_pb2.ModelStatus


def scale_model(root: Path, name: str = "scale", factor: float = 3.0) -> model_pb2.ModelConfig:
    """INPUT0 FP32 [4] -> OUTPUT0 = factor * INPUT0, batching up to 8 rows."""
    folder = root / name
    folder.mkdir(parents=True)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["INPUT0", "k"], ["OUTPUT0"])],
        name,
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.array(factor, dtype=np.float32), "k")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, folder / "model.onnx")
    config = modelconfig.parse({
        "name": name,
        "version": "7",
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [4]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [4]}],
        "max_batch_size": 8,
    })
    modelconfig.write(folder, config)
    return modelconfig.load(folder)


async def registration(infra: Infra, worker_id: str) -> registry_pb2.InstanceInfo | None:
    store = EtcdStore([("127.0.0.1", infra.etcd.port)], auth=infra.etcd_auth)
    try:
        key = instance_key("/unimodel/v1", "gpu-worker", worker_id).encode()
        kvs, _ = await store.get_prefix(key)
    finally:
        await store.close()
    return registry_pb2.InstanceInfo.FromString(kvs[key]) if key in kvs else None


async def wait_for(infra: Infra, worker_id: str, check, timeout: float = 20) -> registry_pb2.InstanceInfo:
    end = time.monotonic() + timeout
    info = None
    while time.monotonic() < end:
        info = await registration(infra, worker_id)
        if info is not None and check(info):
            return info
        await asyncio.sleep(0.1)
    raise AssertionError(f"registration of {worker_id} never matched; last: {info}")


async def health(address: str, service: str = "") -> str:
    """The worker's gRPC health status: overall ("", readiness) or `service` ("liveness")."""
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def health_becomes(address: str, wanted: str, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while (now := await health(address)) != wanted:
        if time.monotonic() > end:
            raise AssertionError(f"health stayed {now}, not {wanted}")
        await asyncio.sleep(0.05)


def states(info: registry_pb2.InstanceInfo) -> dict[str, tuple[int, str]]:
    return {s.name: (s.state, s.error) for s in info.model_states}


async def send_batch(nc: nats.NATS, worker_id: str, batch: inference_pb2.BatchRequest) -> tuple[inference_pb2.BatchAck, list[nats.aio.msg.Msg]]:
    """Items answer at their own inboxes; returns the ack and each item's answer in order."""
    subs = []
    for n, item in enumerate(batch.items):
        item.reply_to = f"{subjects.replies('test-gateway')}.{n}"  # a worker answers only at replies(id) inboxes
        subs.append(await nc.subscribe(item.reply_to, max_msgs=1))
    reply = await nc.request(subjects.worker_infer(worker_id), batch.SerializeToString(), timeout=10)
    raise_for_error_headers(reply)
    answers = [await sub.next_msg(timeout=5) for sub in subs]
    return inference_pb2.BatchAck.FromString(reply.data), answers


def error_of(msg: nats.aio.msg.Msg) -> UnimodelError:
    try:
        raise_for_error_headers(msg)
    except UnimodelError as exc:
        return exc
    raise AssertionError("no error headers")


async def test_load_run_and_unload_a_model_on_command(services: Services, tmp_path: Path) -> None:
    infra = services.infra
    proc = services.start("gpu-worker", "--instance-id", "worker-m", name="worker-m")
    info = await wait_for(infra, "worker-m", lambda i: "echo" in i.models)
    # what this venv can run (llama_cpp from the llm extra; vllm only where it is installed; ctranslate2 from
    # the audio extra), in order
    optional = [kind for kind, module in (("llamacpp", "llama_cpp"), ("vllm", "vllm")) if importlib.util.find_spec(module)]
    speech = ["whisper"] if importlib.util.find_spec("ctranslate2") else []
    assert list(info.engines) == ["onnx", *optional, "openai", *speech, "delay", "echo"]
    assert states(info) == {"echo": (S.READY, "")} and info.model_states[0].pinned
    address = info.grpc_address  # every model placed here is loaded: ready and alive
    assert (await health(address), await health(address, "liveness")) == ("SERVING", "SERVING")

    config = scale_model(tmp_path)
    nc = await nats.connect(infra.nats.url)
    try:
        control = subjects.worker_control("worker-m")
        reply = await nc.request(control, registry_pb2.ModelCommand(load=config).SerializeToString(), timeout=5)
        raise_for_error_headers(reply)
        status = registry_pb2.ModelStatus.FromString(reply.data)
        assert (status.name, status.state) == ("scale", S.LOADING)
        info = await wait_for(infra, "worker-m", lambda i: "scale" in i.models)
        assert states(info)["scale"] == (S.READY, "") and sorted(info.models) == ["echo", "scale"]
        # the same command again is a no-op
        again = await nc.request(control, registry_pb2.ModelCommand(load=config).SerializeToString(), timeout=5)
        assert registry_pb2.ModelStatus.FromString(again.data).state == S.READY

        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        batch = inference_pb2.BatchRequest(batch_id="b-1", model="scale", path=["batcher-t", "router-t"])
        batch.items.add(request_id="a", id="client-a", inputs=[from_numpy("INPUT0", x[:1])])
        batch.items.add(request_id="b", id="client-b", inputs=[from_numpy("INPUT0", x[1:])])
        batch.items.add(request_id="c", inputs=[from_numpy("INPUT0", np.zeros((1, 3), np.float32))])
        batch.items.add(request_id="d", input=to_value({"INPUT0": [1, 2, 3, 4]}))
        ack, answers = await send_batch(nc, "worker-m", batch)
        assert (ack.batch_id, ack.worker_id, ack.succeeded, ack.failed) == ("b-1", "worker-m", 3, 1)
        first = inference_pb2.InferResponse.FromString(answers[0].data)
        assert (first.model, first.model_version, first.id, first.worker_id) == ("scale", "7", "client-a", "worker-m")
        assert list(first.path) == ["batcher-t", "router-t", "worker-m"]
        np.testing.assert_array_equal(to_numpy(first.outputs[0]), x[:1] * 3)
        second = inference_pb2.InferResponse.FromString(answers[1].data)
        assert second.id == "client-b" and list(second.outputs[0].shape) == [2, 4]
        np.testing.assert_array_equal(to_numpy(second.outputs[0]), x[1:] * 3)
        err = error_of(answers[2])
        assert isinstance(err, InvalidArgument) and "shape [1, 3], expected [-1, 4]" in err.message
        predicted = inference_pb2.PredictResponse.FromString(answers[3].data)
        assert from_value(predicted.output) == {"OUTPUT0": [3, 6, 9, 12]} and predicted.worker_id == "worker-m"

        # a broken model fails to load and says why; the worker keeps serving the others
        broken = scale_model(tmp_path, name="broken")
        (Path(broken.path) / "model.onnx").write_bytes(b"garbage")
        await nc.request(control, registry_pb2.ModelCommand(load=broken).SerializeToString(), timeout=5)
        info = await wait_for(infra, "worker-m", lambda i: states(i).get("broken", (0, ""))[0] == S.FAILED)
        assert "cannot load" in states(info)["broken"][1] and "broken" not in info.models
        # a model placed here and not loaded: not ready (Kubernetes' readinessProbe), but alive (livenessProbe)
        await health_becomes(address, "NOT_SERVING")
        assert await health(address, "liveness") == "SERVING"
        assert any("NOT_SERVING (failed: broken)" in line for line in proc.lines)

        reply = await nc.request(control, registry_pb2.ModelCommand(unload="scale").SerializeToString(), timeout=5)
        assert registry_pb2.ModelStatus.FromString(reply.data).state == S.UNLOADING
        info = await wait_for(infra, "worker-m", lambda i: "scale" not in states(i))
        assert sorted(info.models) == ["echo"]
        gone = await nc.request(subjects.worker_infer("worker-m"), batch.SerializeToString(), timeout=5)
        err = error_of(gone)
        assert isinstance(err, NotFound) and "'scale' is not loaded on worker-m" in err.message

        await nc.request(control, registry_pb2.ModelCommand(unload="broken").SerializeToString(), timeout=5)
        await wait_for(infra, "worker-m", lambda i: "broken" not in states(i))
        await health_becomes(address, "SERVING")  # nothing placed here is left unloaded
    finally:
        await nc.close()
    assert proc.alive()


async def test_models_from_the_repository_are_loaded_at_start_and_pinned(services: Services, tmp_path: Path) -> None:
    scale_model(tmp_path / "repo", factor=2.0)
    services.start(
        "gpu-worker", "--instance-id", "worker-r", "--models", "", "--model-repository", str(tmp_path / "repo"),
        "--load", "scale", name="worker-r",
    )
    info = await wait_for(services.infra, "worker-r", lambda i: list(i.models) == ["scale"])
    (status,) = info.model_states
    assert status.state == S.READY and status.pinned
    nc = await nats.connect(services.infra.nats.url)
    try:
        batch = inference_pb2.BatchRequest(batch_id="b", model="scale")
        batch.items.add(inputs=[from_numpy("INPUT0", np.ones((1, 4), np.float32))])
        ack, (answer,) = await send_batch(nc, "worker-r", batch)
        assert ack.succeeded == 1
        np.testing.assert_array_equal(to_numpy(inference_pb2.InferResponse.FromString(answer.data).outputs[0]), [[2, 2, 2, 2]])
    finally:
        await nc.close()


async def test_inflight_batches_are_reported_and_unload_waits_for_them(services: Services) -> None:
    services.start("gpu-worker", "--instance-id", "worker-d", name="worker-d")
    await wait_for(services.infra, "worker-d", lambda i: "echo" in i.models)
    delay = modelconfig.parse({
        "name": "slow",
        "engine": "delay",
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}],
        "max_batch_size": 4,
        "options": {"delay_ms": "3000"},
    })
    nc = await nats.connect(services.infra.nats.url)
    try:
        control = subjects.worker_control("worker-d")
        await nc.request(control, registry_pb2.ModelCommand(load=delay).SerializeToString(), timeout=5)
        await wait_for(services.infra, "worker-d", lambda i: "slow" in i.models)
        batch = inference_pb2.BatchRequest(batch_id="slow-1", model="slow")
        batch.items.add(inputs=[from_numpy("INPUT0", np.array([[1.0, 2.0]], np.float32))])
        running = asyncio.create_task(send_batch(nc, "worker-d", batch))
        info = await wait_for(services.infra, "worker-d", lambda i: any(s.inflight == 1 for s in i.model_states), 2.8)
        assert {s.name: s.inflight for s in info.model_states} == {"echo": 0, "slow": 1}
        reply = await nc.request(control, registry_pb2.ModelCommand(unload="slow").SerializeToString(), timeout=5)
        assert registry_pb2.ModelStatus.FromString(reply.data).state == S.UNLOADING
        info = await wait_for(services.infra, "worker-d", lambda i: states(i).get("slow", (0, ""))[0] == S.UNLOADING)
        assert "slow" not in info.models
        ack, (answer,) = await running  # the running batch still finishes
        assert ack.succeeded == 1
        np.testing.assert_array_equal(to_numpy(inference_pb2.InferResponse.FromString(answer.data).outputs[0]), [[1, 2]])
        await wait_for(services.infra, "worker-d", lambda i: "slow" not in states(i))
    finally:
        await nc.close()
