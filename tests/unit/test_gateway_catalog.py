"""The gateway's catalog: models from the workers' registrations and the registered configs, with their
state and engine."""

from __future__ import annotations

from unimodel.core import modelconfig
from unimodel.gateway import catalog
from unimodel.v1 import model_pb2, registry_pb2

S = registry_pb2.ModelStatus


def worker(wid: str, *states: S, kind: str = "gpu-worker") -> registry_pb2.InstanceInfo:
    """A worker's registration as WorkerService.instance_info builds it: READY models in `models`."""
    return registry_pb2.InstanceInfo(
        id=wid, kind=kind, models=[s.name for s in states if s.state == S.READY], model_states=list(states)
    )


def config(name: str, engine: str = "delay") -> model_pb2.ModelConfig:
    return modelconfig.parse({
        "name": name, "engine": engine, "max_batch_size": 4,
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}],
    })


def test_a_built_in_model_carries_the_engine_its_workers_report() -> None:
    echo = S(name="echo", state=S.READY, pinned=True, engine="echo")
    models = catalog.models({"w1": worker("w1", echo), "w2": worker("w2", echo, kind="embedding-worker")})
    entry = models["echo"]
    assert not entry.registered and entry.state == "READY" and entry.instances == ("w1", "w2")
    assert entry.engine == "echo"
    assert [(s.id, s.engine) for s in entry.states] == [("w1", "echo"), ("w2", "echo")]


def test_a_registered_model_carries_its_config_engine() -> None:
    reported = S(name="m", state=S.READY, engine="echo")  # a worker's word never overrides the config
    models = catalog.models({"w1": worker("w1", reported)}, {"m": config("m", "delay"), "idle": config("idle", "onnx")})
    assert models["m"].engine == "delay" and models["idle"].engine == "onnx"
    assert models["idle"].state == "LOADING" and models["idle"].instances == ()


def test_a_ready_instance_names_the_engine_before_one_that_loads_or_failed() -> None:
    instances = {
        "w1": worker("w1", S(name="x", state=S.FAILED, error="boom", engine="onnx")),
        "w2": worker("w2", S(name="x", state=S.LOADING, engine="vllm")),
        "w3": worker("w3", S(name="x", state=S.READY, engine="llamacpp")),
    }
    entry = catalog.models(instances)["x"]
    assert entry.instances == ("w3",) and entry.engine == "llamacpp"
    assert [s.engine for s in entry.states] == ["onnx", "vllm", "llamacpp"]  # each instance's own word is kept


def test_no_engine_when_no_worker_says() -> None:
    # a worker that lists its models without states (an older registration) still serves them
    old = registry_pb2.InstanceInfo(id="w1", kind="gpu-worker", models=["echo"])
    silent = worker("w2", S(name="other", state=S.READY))
    models = catalog.models({"w1": old, "w2": silent, "gw": registry_pb2.InstanceInfo(id="gw", kind="gateway")})
    assert set(models) == {"echo", "other"}
    assert models["echo"].state == "READY" and models["echo"].engine == ""
    assert models["other"].engine == ""
