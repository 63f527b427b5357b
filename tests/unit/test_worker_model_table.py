"""The hosted-model table: load / reload / unload state transitions, in-flight batches, errors."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from test_worker_onnx import identity_model

from unimodel.core import errors, modelconfig
from unimodel.v1 import model_pb2, registry_pb2
from unimodel.worker.engines import Engine, create_engine
from unimodel.worker.models import ModelTable, builtin_config

S = registry_pb2.ModelStatus


class Gated(Engine):
    """Loads when the test opens its gate; records unloads."""

    kind = "gated"
    gates: dict[str, asyncio.Event] = {}
    unloaded: list[str] = []

    async def load(self) -> None:
        if self.config.options.get("fail"):
            raise errors.FailedPrecondition(self.config.options["fail"])
        await self.gates.setdefault(self.config.version, asyncio.Event()).wait()

    async def unload(self) -> None:
        self.unloaded.append(self.config.version)

    async def infer(self, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        return {}


def open_gate(version: str) -> None:
    Gated.gates.setdefault(version, asyncio.Event()).set()


def cfg(version: str = "1", engine: str = "delay", **options: str) -> model_pb2.ModelConfig:
    return modelconfig.parse({
        "name": "m",
        "engine": engine,
        "version": version,
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}],
        "max_batch_size": 4,
        "options": options,
    })


@pytest.fixture
def gated() -> ModelTable:
    Gated.gates, Gated.unloaded = {}, []
    return ModelTable(engine_factory=Gated)


def state(table: ModelTable, name: str = "m") -> tuple[int, str]:
    s = table.status(name)
    return s.state, s.error


async def test_load_answers_loading_then_becomes_ready(gated: ModelTable) -> None:
    changes = []
    gated.on_change = lambda: changes.append(state(gated))
    reply = gated.load(cfg())
    assert reply.state == S.LOADING and state(gated) == (S.LOADING, "")
    assert gated.ready() == []
    with pytest.raises(errors.Unavailable, match="is loading") as info:
        gated.acquire("m")
    assert info.value.retry_after_s == 1
    open_gate("1")
    await gated.settle()
    assert state(gated) == (S.READY, "") and gated.ready() == ["m"]
    assert changes == [(S.LOADING, ""), (S.READY, "")]
    # the same config again is a no-op
    assert gated.load(cfg()).state == S.READY
    assert not gated._tasks


async def test_unknown_and_failed_models(gated: ModelTable) -> None:
    with pytest.raises(errors.NotFound, match="'m' is not loaded"):
        gated.acquire("m")
    gated.load(cfg(fail="no such file"))
    await gated.settle()
    assert state(gated) == (S.FAILED, "no such file")
    with pytest.raises(errors.Unavailable, match="failed to load on this worker: no such file"):
        gated.acquire("m")
    # a command for the same config retries the load
    assert gated.load(cfg(fail="no such file")).state == S.LOADING
    await gated.settle()
    assert state(gated)[0] == S.FAILED
    assert gated.unload("other") == registry_pb2.ModelStatus(name="other")


async def test_not_loaded_names_the_models_placed_here_that_are_loading_or_failed(gated: ModelTable) -> None:
    """The worker's readiness (its gRPC health): "" only when every model placed here is READY."""
    assert gated.not_loaded() == ""  # none placed
    gated.load(cfg())
    assert gated.not_loaded() == "loading: m"
    gated.load(modelconfig.parse({**_other("x"), "options": {"fail": "no file"}}))
    for _ in range(200):  # x fails at once; m waits for its gate
        if state(gated, "x")[0] == S.FAILED:
            break
        await asyncio.sleep(0.005)
    assert gated.not_loaded() == "loading: m; failed: x"
    open_gate("1")
    await gated.settle()
    assert gated.not_loaded() == "failed: x"
    gated.unload("x")
    await gated.settle()
    assert gated.not_loaded() == ""


def _other(name: str) -> dict[str, object]:
    return {
        "name": name, "engine": "delay", "version": "9",
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}],
    }


async def test_reload_keeps_the_old_version_serving_until_the_new_one_is_ready(gated: ModelTable) -> None:
    open_gate("1")
    await gated.load_now(cfg("1"))
    old = gated.acquire("m")
    assert gated.load(cfg("2")).state == S.LOADING
    await asyncio.sleep(0.01)
    assert state(gated)[0] == S.READY and gated.acquire("m") is old  # still the old one
    gated.release(old)
    open_gate("2")
    await asyncio.sleep(0.01)
    new = gated.acquire("m")
    assert new is not old and new.config.version == "2"
    assert Gated.unloaded == []  # the old version still runs a batch
    assert gated.status("m").inflight == 1
    gated.release(old)
    await gated.settle()
    assert Gated.unloaded == ["1"]
    gated.release(new)


async def test_states_name_the_engine_of_the_version_that_serves(gated: ModelTable) -> None:
    assert gated.load(cfg("1")).engine == "delay"  # loading: the engine asked for
    open_gate("1")
    await gated.settle()
    assert gated.status("m").engine == "delay"
    gated.load(cfg("2", engine="echo"))
    await asyncio.sleep(0.01)
    assert gated.status("m").state == S.READY and gated.status("m").engine == "delay"  # v1 still serves
    open_gate("2")
    await gated.settle()
    assert gated.status("m").engine == "echo"
    gated.load(cfg("3", fail="boom"))
    await gated.settle()
    assert state(gated) == (S.FAILED, "boom") and gated.status("m").engine == "delay"  # what failed to load


async def test_unload_waits_for_inflight_batches(gated: ModelTable) -> None:
    open_gate("1")
    await gated.load_now(cfg(), pinned=True)
    assert gated.status("m").pinned and gated.pinned() == ["m"]
    batches = [gated.acquire("m"), gated.acquire("m")]
    assert gated.status("m").inflight == 2 and gated.inflight() == (("m", 2),)
    reply = gated.unload("m")
    assert reply.state == S.UNLOADING and reply.inflight == 2
    with pytest.raises(errors.Unavailable, match="is unloading"):
        gated.acquire("m")
    gated.release(batches[0])
    await asyncio.sleep(0.01)
    assert Gated.unloaded == [] and "m" in gated
    gated.release(batches[1])
    await gated.settle()
    assert Gated.unloaded == ["1"] and "m" not in gated and gated.states() == []


async def test_unload_during_load_discards_the_load(gated: ModelTable) -> None:
    gated.load(cfg())
    await asyncio.sleep(0)
    gated.unload("m")
    open_gate("1")
    await gated.settle()
    assert "m" not in gated and Gated.unloaded == ["1"]


async def test_load_after_unload_hosts_the_model_again(gated: ModelTable) -> None:
    open_gate("1")
    await gated.load_now(cfg())
    gated.unload("m")
    assert gated.load(cfg()).state == S.LOADING
    await gated.settle()
    assert state(gated) == (S.READY, "") and Gated.unloaded == ["1"]


async def test_real_engines_load_and_close(tmp_path: Path) -> None:
    table = ModelTable(owner="w-1", max_concurrent=3)
    await table.load_now(builtin_config("echo"), pinned=True)
    table.load(identity_model(tmp_path))
    broken = identity_model(tmp_path, name="broken")
    (Path(broken.path) / "model.onnx").unlink()
    table.load(broken)
    await table.settle()
    states = {s.name: (s.state, s.error) for s in table.states()}
    assert states["echo"] == (S.READY, "") and states["identity"] == (S.READY, "")
    assert states["broken"][0] == S.FAILED and "model.onnx does not exist" in states["broken"][1]
    assert table.ready() == ["echo", "identity"]
    # batches run at once: the ONNX engine's session count (instance_count 1); echo has no limit of its own
    concurrency = {s.name: s.concurrency for s in table.states()}
    assert concurrency == {"echo": 3, "identity": 1, "broken": 0}
    assert {s.name: s.engine for s in table.states()} == {"echo": "echo", "identity": "onnx", "broken": "onnx"}
    engine = table.get("identity")
    assert engine is not None
    await table.close()
    assert table.states() == [] and engine.engine._sessions is None  # type: ignore[attr-defined]  # _sessions is the ONNX engine's; the table holds it as an Engine


def test_builtin_config() -> None:
    config = builtin_config("echo")
    assert config.engine == "echo" and create_engine(config).takes_values
    with pytest.raises(errors.InvalidArgument, match="unknown built-in model"):
        builtin_config("nope")


async def test_admit_refuses_a_batch_while_every_slot_of_a_batching_model_is_taken() -> None:
    """The batchers share a model's slots; admit() keeps the limit exact while their views differ."""
    Gated.gates, Gated.unloaded = {}, []
    table = ModelTable(engine_factory=Gated, max_concurrent=2)
    table.load(cfg())  # max_batch_size 4: a model that batches
    table.load(modelconfig.parse({**_other("one"), "max_batch_size": 0}))  # one row per batch
    open_gate("1")
    open_gate("9")
    await table.settle()
    first, second = table.admit("m"), table.admit("m")
    assert first is not None and second is not None and table.status("m").concurrency == 2
    assert table.admit("m") is None  # both slots taken: refused, nothing counted
    assert first.inflight == 2 and first.busy == 1 and first.peak == 2
    table.release(second)
    third = table.admit("m")
    assert third is first and first.inflight == 2 and first.peak == 2
    # a model of one row per batch is always admitted (its batches lose nothing by waiting here)
    ones = [table.admit("one") for _ in range(5)]
    assert all(o is not None for o in ones) and table.get("one").peak == 5  # type: ignore[union-attr]  # loaded above
    with pytest.raises(errors.NotFound):
        table.admit("missing")
