"""gpu-worker runtime: loads engines, registers with its models, runs batches sent to its NATS subject.

Each item's result goes straight to the caller's inbox (item.reply_to); the router gets a BatchAck.
"""

from __future__ import annotations

import asyncio

from nats.aio.msg import Msg

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

    async def _on_batch(self, msg: Msg, ctx: RequestContext) -> bytes:
        batch = inference_pb2.BatchRequest.FromString(msg.data)
        engine = self.engines.get(batch.model)
        if engine is None:
            raise errors.NotFound(f"model {batch.model!r} is not loaded on {self.id}", model=batch.model)
        async with self._slots:
            outcomes = await run_batch(engine, batch)
        path = [*batch.path, self.id]
        ack = inference_pb2.BatchAck(batch_id=batch.batch_id, worker_id=self.id)
        for item, outcome in zip(batch.items, outcomes, strict=True):
            if isinstance(outcome, errors.UnimodelError):
                ack.failed += 1
                if item.reply_to:
                    await self.bus.publish_error(item.reply_to, outcome)
                continue
            ack.succeeded += 1
            if item.reply_to:
                reply = inference_pb2.PredictResponse(model=batch.model, output=outcome, worker_id=self.id, path=path)
                await self.bus.publish(item.reply_to, reply.SerializeToString())
        return ack.SerializeToString()

    async def on_close(self) -> None:
        for engine in self.engines.values():
            await engine.unload()
        self.engines.clear()
