"""A plain in-memory double of the gateway service at the KServe boundary, for the protocol translation
unit tests (test_kserve_http.py, test_kserve_grpc.py). The real service path is covered by
tests/integration/test_kserve_clients.py.

The double offers what kserve/http.py and kserve/grpc.py use of the gateway (ports.KServePorts): configs(),
model_ready(), readiness(), model_stats, settings, log, and infer(). Its infer checks every input with
the real unimodel.core.tensors.check_input and answers as an identity model would: output i holds input
i's data (the "worker" is this object). Each call is kept in `calls` for the tests to inspect.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from unimodel.core import errors, modelconfig, tensors
from unimodel.core.context import RequestContext
from unimodel.core.grpc_server import GrpcServer
from unimodel.gateway.auth import ApiKeys
from unimodel.gateway.big_bodies import BodyCodec
from unimodel.gateway.kserve.grpc import add_kserve_grpc
from unimodel.gateway.statistics import ModelStatistics
from unimodel.v1 import inference_pb2, model_pb2, tensor_pb2

CONFIGS = [
    {"name": "identity", "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
     "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}], "max_batch_size": 8,
     "batching": {"max_queue_delay_ms": 0.5, "preferred_batch_sizes": [4, 8], "priority_levels": 2}},
    {"name": "strings", "engine": "echo", "inputs": [{"name": "TEXT", "datatype": "BYTES", "dims": [-1]}],
     "outputs": [{"name": "ECHO", "datatype": "BYTES", "dims": [-1]}], "max_batch_size": 4},
    {"name": "multi", "engine": "echo", "version": "3",
     "inputs": [{"name": "A", "datatype": "INT32", "dims": [2]}, {"name": "B", "datatype": "FP16", "dims": [2]}],
     "outputs": [{"name": "OUT_A", "datatype": "INT32", "dims": [2]}, {"name": "OUT_B", "datatype": "FP16", "dims": [2]}]},
    {"name": "org/model", "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
     "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}], "max_batch_size": 8},
    {"name": "loading", "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [1]}],
     "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [1]}]},
]


@dataclass
class Call:
    model: str
    item: inference_pb2.BatchItem
    ctx: RequestContext
    api: str


@dataclass
class KServeDouble:
    configs_by_name: dict[str, model_pb2.ModelConfig] = field(default_factory=dict)
    ready_models: set[str] = field(default_factory=lambda: {"identity", "strings", "multi", "org/model", "echo"})
    ready_checks: dict[str, bool] = field(default_factory=lambda: {"nats": True, "etcd": True, "models": True})
    fail_with: errors.UnimodelError | None = None
    calls: list[Call] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.configs_by_name:
            self.configs_by_name = {c["name"]: modelconfig.parse(dict(c)) for c in CONFIGS}
        self.settings = SimpleNamespace(request_timeout_s=30.0, max_body_bytes=1 << 20, big_transfer_bytes_per_s=0)
        self.body_codec = BodyCodec(0, 0)  # bodies decoded here, on the event loop
        self.log = logging.getLogger("kserve-double")
        self.model_stats = ModelStatistics()
        self.id = "gateway-double"
        self.auth = ApiKeys({})  # auth off, as in the local cluster

    def configs(self) -> dict[str, model_pb2.ModelConfig]:
        return self.configs_by_name

    async def cluster_model_stats(self) -> ModelStatistics:
        return self.model_stats  # one gateway: its own (the cluster's sum is tested in test_cluster_stats.py)

    def model_ready(self, name: str) -> bool:
        return name in self.ready_models

    def readiness(self) -> dict[str, bool]:
        return dict(self.ready_checks)

    async def infer(
        self, model: str, item: inference_pb2.BatchItem, ctx: RequestContext, api: str
    ) -> inference_pb2.InferResponse:
        started = time.perf_counter_ns()
        self.calls.append(Call(model, item, ctx, api))
        ok = False
        try:
            reply = self._answer(model, item)
            ok = True
            return reply
        finally:
            self.model_stats.record(model, ok, time.perf_counter_ns() - started, item.rows)

    def _answer(self, model: str, item: inference_pb2.BatchItem) -> inference_pb2.InferResponse:
        if self.fail_with is not None:
            raise self.fail_with
        config = self.configs_by_name.get(model)
        if config is None and model not in self.ready_models:
            raise errors.NotFound(f"model {model!r} not found", model=model)
        if model not in self.ready_models:
            raise errors.Unavailable(f"model {model!r} is loading", retry_after_s=1, model=model)
        if config is None:  # a built-in echo: everything back as it came
            return inference_pb2.InferResponse(model=model, id=item.id, outputs=item.inputs, worker_id="w1", path=["w1"])
        given = {t.name: t for t in item.inputs}
        rows = 0
        for spec in config.inputs:
            if spec.name not in given:
                raise errors.InvalidArgument(f"input {spec.name!r} of model {model!r} is missing", field=spec.name)
            rows = tensors.check_input(spec, given[spec.name], config.max_batch_size, model)
        item.rows = rows
        outputs = []
        for spec, in_spec in zip(config.outputs, config.inputs, strict=True):
            src = given[in_spec.name]
            outputs.append(tensor_pb2.Tensor(name=spec.name, datatype=spec.datatype, shape=src.shape, contents=src.contents))
        if item.outputs:
            names = {o.name for o in outputs}
            for name in item.outputs:
                if name not in names:
                    raise errors.InvalidArgument(f"model {model!r} has no output {name!r}", field=name)
            outputs = [o for o in outputs if o.name in set(item.outputs)]
        return inference_pb2.InferResponse(
            model=model, model_version="", id=item.id, outputs=outputs, worker_id="w1", path=["gateway-double", "w1"]
        )


@contextlib.asynccontextmanager
async def serve_kserve_grpc(gw: KServeDouble, interceptors: Sequence[Any] = ()) -> AsyncIterator[str]:
    """The KServe gRPC API over `gw`, served on a Unix socket in a temporary folder (only the GrpcServer's grpc.aio
    server runs, no TCP port); yields the socket's target, stops the server on exit."""
    wrapper = GrpcServer("127.0.0.1", 0, interceptors=list(interceptors))
    add_kserve_grpc(wrapper, gw)  # type: ignore[arg-type]  # KServeDouble has only what the KServe code calls, not every KServePorts member
    with tempfile.TemporaryDirectory(prefix="kserve-") as folder:
        target = f"unix:{Path(folder) / 'grpc.sock'}"
        assert wrapper.server.add_insecure_port(target)
        await wrapper.server.start()
        try:
            yield target
        finally:
            await wrapper.server.stop(None)


def test_the_double_answers_like_an_identity_model() -> None:
    import asyncio

    import numpy as np

    gw = KServeDouble()
    item = inference_pb2.BatchItem(inputs=[tensors.from_numpy("INPUT0", np.ones((2, 3), np.float32))])
    reply = asyncio.run(gw.infer("identity", item, RequestContext.new(1), "test"))
    assert reply.outputs[0].name == "OUTPUT0" and reply.outputs[0].contents == item.inputs[0].contents
    assert gw.model_stats.snapshot("identity").inference_count == 2
