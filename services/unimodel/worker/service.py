"""gpu-worker runtime: loads engines, registers with its models, runs batches sent to its NATS subject."""

from __future__ import annotations

import asyncio

from unimodel.core import errors, subjects
from unimodel.core.context import RequestContext
from unimodel.core.lifecycle import Service
from unimodel.v1 import inference_pb2, registry_pb2
from unimodel.worker.engines import Engine, builtin_engine
from unimodel.worker.runner import run_batch
from unimodel.worker.settings import WorkerSettings


class WorkerService(Service):
    kind = "gpu-worker"
    settings: WorkerSettings

    def __init__(self, settings: WorkerSettings, **kw) -> None:  # type: ignore[no-untyped-def]
        super().__init__(settings, **kw)
        self.engines: dict[str, Engine] = {}
        self.subject = subjects.worker_infer(self.id)
        self._slots = asyncio.Semaphore(settings.max_concurrent_batches)

    async def on_start(self) -> None:
        for name in self.settings.model_list:
            engine = builtin_engine(name)
            await engine.load()
            self.engines[name] = engine
            self.log.info("loaded model %s (%s engine)", name, engine.kind)
        await self.bus.serve(self.subject, self._on_batch)

    def instance_info(self) -> registry_pb2.InstanceInfo:
        info = super().instance_info()
        info.nats_subject = self.subject
        info.models.extend(sorted(self.engines))
        return info

    async def _on_batch(self, payload: bytes, ctx: RequestContext, subject: str) -> bytes:
        batch = inference_pb2.BatchRequest.FromString(payload)
        engine = self.engines.get(batch.model)
        if engine is None:
            raise errors.NotFound(f"model {batch.model!r} is not loaded on {self.id}", model=batch.model)
        async with self._slots:
            response = await run_batch(engine, batch, self.id)
        return response.SerializeToString()

    async def on_close(self) -> None:
        for engine in self.engines.values():
            await engine.unload()
        self.engines.clear()
