"""run_batch: expired items, per-item errors, one engine call per shape group, row chunks, engines."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np
import pytest

from unimodel.core import errors, modelconfig
from unimodel.core.context import now_ms
from unimodel.core.tensors import from_numpy
from unimodel.core.values import from_value, to_value
from unimodel.v1 import inference_pb2, model_pb2
from unimodel.worker.engines import Engine, create_engine
from unimodel.worker.engines.builtin import DelayEngine, EchoEngine
from unimodel.worker.models import LoadedModel, builtin_config
from unimodel.worker.processors import make_processor
from unimodel.worker.runner import run_batch
from unimodel.worker.tensor_batches import Layout


def config(name: str = "m", engine: str = "echo", **data: object) -> model_pb2.ModelConfig:
    base: dict[str, object] = {
        "name": name,
        "engine": engine,
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}],
        "max_batch_size": 4,
    }
    return modelconfig.parse({**base, **data})


class Recording(Engine):
    """Doubles INPUT0; records the shape of every call."""

    kind = "recording"

    def __init__(self, config: model_pb2.ModelConfig) -> None:
        super().__init__(config)
        self.calls: list[tuple[int, ...]] = []

    async def infer(self, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        x = inputs["INPUT0"]
        self.calls.append(x.shape)
        return {name: x * 2 for name in outputs}


class Failing(Engine):
    async def infer(self, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        raise errors.InvalidArgument("bad tensor")


class Broken(Engine):
    async def infer(self, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        raise RuntimeError("segfault-ish")


def hosted(engine: Engine) -> LoadedModel:
    layout = Layout.of(engine.config)
    processor = None if engine.takes_values else make_processor(engine.config, layout)
    return LoadedModel(engine.config, engine, layout, processor)


def tensor_batch(*arrays: np.ndarray, deadlines: Sequence[int] = ()) -> inference_pb2.BatchRequest:
    b = inference_pb2.BatchRequest(batch_id="b1", model="m", path=["batcher-1", "router-1"])
    for i, a in enumerate(arrays):
        b.items.add(
            request_id=f"r{i}", inputs=[from_numpy("INPUT0", a)], deadline_unix_ms=deadlines[i] if deadlines else 0
        )
    return b


def value_batch(*items: tuple[object, int]) -> inference_pb2.BatchRequest:
    b = inference_pb2.BatchRequest(batch_id="b1", model="m", path=["batcher-1", "router-1"])
    for value, deadline in items:
        b.items.add(request_id=f"r{value}", input=to_value(value), deadline_unix_ms=deadline)
    return b


def rows(x: list[float]) -> np.ndarray:
    return np.array([x], dtype=np.float32)


async def test_expired_items_are_answered_not_executed() -> None:
    engine = Recording(config())
    out = await run_batch(
        hosted(engine),
        tensor_batch(rows([1]), rows([2]), rows([3]), deadlines=[0, now_ms() - 5, now_ms() + 60_000]),
    )
    assert engine.calls == [(2, 1)]
    assert out[0]["OUTPUT0"].tolist() == [[2]] and out[2]["OUTPUT0"].tolist() == [[6]]
    assert isinstance(out[1], errors.DeadlineExceeded)


async def test_failed_batch_fails_every_item_with_the_cause() -> None:
    out = await run_batch(hosted(Failing(config())), tensor_batch(rows([1]), rows([2])))
    assert all(isinstance(o, errors.InvalidArgument) and o.message == "bad tensor" for o in out)
    out = await run_batch(hosted(Broken(config())), tensor_batch(rows([1])))
    assert isinstance(out[0], errors.Internal) and "engine failed" in out[0].message


async def test_echo_returns_values_and_tensors() -> None:
    model = hosted(EchoEngine(builtin_config("echo")))
    out = await run_batch(model, value_batch(({"a": [1, "x"]}, 0), (5, 0)))
    assert [from_value(o) for o in out] == [{"a": [1, "x"]}, 5]
    out = await run_batch(model, tensor_batch(rows([1, 2])))
    assert list(out[0]) == ["OUTPUT0"] and out[0]["OUTPUT0"].tolist() == [[1, 2]]


async def test_bad_items_fail_alone_and_the_rest_run_once_per_shape() -> None:
    engine = Recording(config())
    batch = tensor_batch(rows([1, 2]), rows([3]), np.zeros((1, 2), np.float64), rows([4, 5]), rows([6]))
    batch.items[4].outputs.append("NOPE")
    out = await run_batch(hosted(engine), batch)
    assert sorted(engine.calls) == [(1, 1), (2, 2)]
    assert out[0]["OUTPUT0"].tolist() == [[2, 4]] and out[3]["OUTPUT0"].tolist() == [[8, 10]]
    assert out[1]["OUTPUT0"].tolist() == [[6]]
    assert isinstance(out[2], errors.InvalidArgument) and "datatype FP64, expected FP32" in out[2].message
    assert isinstance(out[4], errors.InvalidArgument) and "no output 'NOPE'" in out[4].message


async def test_padding_runs_one_call() -> None:
    engine = Recording(config(options={"pad": "zeros"}, outputs=[{"name": "OUTPUT0", "datatype": "FP32", "dims": [3]}]))
    out = await run_batch(hosted(engine), tensor_batch(rows([1, 2]), rows([3]), rows([1, 1, 1])))
    assert engine.calls == [(3, 3)]
    assert out[1]["OUTPUT0"].tolist() == [[6, 0, 0]]


async def test_more_rows_than_max_batch_size_run_in_chunks() -> None:
    engine = Recording(config(inputs=[{"name": "INPUT0", "datatype": "FP32", "dims": [1]}], max_batch_size=2))
    arrays = [np.full((1, 1), i, np.float32) for i in range(5)]
    out = await run_batch(hosted(engine), tensor_batch(*arrays))
    assert engine.calls == [(2, 1), (2, 1), (1, 1)]
    assert [o["OUTPUT0"].item() for o in out] == [0, 2, 4, 6, 8]


async def test_values_go_through_processing() -> None:
    engine = Recording(config())
    out = await run_batch(hosted(engine), value_batch(([1, 2], 0), ({"INPUT0": [[3]]}, 0), ("x", 0), ([4], now_ms() - 1)))
    assert from_value(out[0]) == {"OUTPUT0": [2, 4]}
    assert from_value(out[1]) == {"OUTPUT0": [[6]]}
    assert isinstance(out[2], errors.InvalidArgument)
    assert isinstance(out[3], errors.DeadlineExceeded)


async def test_mixed_tensor_and_value_items() -> None:
    engine = Recording(config())
    batch = tensor_batch(rows([1]))
    batch.items.add(input=to_value([7]))
    out = await run_batch(hosted(engine), batch)
    assert out[0]["OUTPUT0"].tolist() == [[2]] and from_value(out[1]) == {"OUTPUT0": [14]}


async def test_delay_engine_waits_without_cpu_and_echoes() -> None:
    engine = create_engine(config(engine="delay", options={"delay_ms": "50"}))
    assert isinstance(engine, DelayEngine)
    model = hosted(engine)
    cpu, wall = time.process_time(), time.perf_counter()
    outs = await asyncio.gather(*(run_batch(model, tensor_batch(rows([i]))) for i in range(10)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert [o[0]["OUTPUT0"].item() for o in outs] == list(range(10))
    assert 0.05 <= wall < 0.5  # ten batches wait side by side
    assert cpu < 0.1
    with pytest.raises(errors.InvalidArgument, match="delay_ms 'soon' is not a number"):
        create_engine(config(engine="delay", options={"delay_ms": "soon"}))


async def test_model_that_does_not_batch() -> None:
    engine = Recording(config(max_batch_size=0, inputs=[{"name": "INPUT0", "datatype": "FP32", "dims": [2]}]))
    out = await run_batch(hosted(engine), tensor_batch(np.ones(2, np.float32), np.zeros(2, np.float32)))
    assert engine.calls == [(2,), (2,)]
    assert out[0]["OUTPUT0"].tolist() == [2, 2]
