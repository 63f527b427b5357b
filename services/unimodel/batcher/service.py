"""batcher runtime: NATS queue group on every model's batch subject, one batch loop per model."""

from __future__ import annotations

import asyncio
import uuid

from unimodel.batcher.queue import BatchPolicy, ModelQueue, Pending
from unimodel.batcher.settings import BatcherSettings
from unimodel.core import errors, subjects
from unimodel.core.context import RequestContext
from unimodel.core.lifecycle import Service
from unimodel.v1 import inference_pb2


class BatcherService(Service):
    kind = "batcher"
    settings: BatcherSettings

    def __init__(self, settings: BatcherSettings, **kw) -> None:  # type: ignore[no-untyped-def]
        super().__init__(settings, **kw)
        self.policy = BatchPolicy(
            max_batch_size=settings.max_batch_size,
            max_queue_delay_s=settings.max_queue_delay_ms / 1000.0,
            max_queue_size=settings.max_queue_size,
        )
        self.queues: dict[str, ModelQueue] = {}
        self._dispatching: set[asyncio.Task[None]] = set()

    async def on_start(self) -> None:
        await self.bus.serve(subjects.BATCH_ALL, self._on_request, queue=subjects.QUEUE_BATCHER)

    def _queue(self, model: str) -> ModelQueue:
        queue = self.queues.get(model)
        if queue is None:
            queue = self.queues[model] = ModelQueue(model, self.policy)
            self.spawn(self._batch_loop(queue), name=f"batch loop {model}")
        return queue

    async def _on_request(self, payload: bytes, ctx: RequestContext, subject: str) -> bytes:
        request = inference_pb2.PredictRequest.FromString(payload)
        model = subjects.model_of(subject)
        if request.model and request.model != model:
            raise errors.InvalidArgument(f"request for {request.model!r} sent on the subject of {model!r}")
        pending = Pending(ctx.request_id, request, ctx.deadline_ms)
        self._queue(model).put(pending)
        try:
            result, path = await pending.future
        finally:
            pending.future.cancel()  # no-op when done; tells the loop the caller left otherwise
        if result.HasField("error"):
            raise errors.from_proto(result.error)
        response = inference_pb2.PredictResponse(model=model, output=result.output, worker_id=path[-1], path=path)
        return response.SerializeToString()

    async def _batch_loop(self, queue: ModelQueue) -> None:
        slots = asyncio.Semaphore(self.settings.max_inflight_batches)
        while True:
            batch = await queue.next_batch(idle_timeout_s=self.settings.queue_idle_s)
            if not batch:
                if len(queue) == 0 and self.queues.get(queue.model) is queue:
                    del self.queues[queue.model]
                    return
                continue
            await slots.acquire()
            task = asyncio.create_task(self._dispatch(queue.model, batch))
            self._dispatching.add(task)
            task.add_done_callback(lambda t: (self._dispatching.discard(t), slots.release()))

    async def _dispatch(self, model: str, batch: list[Pending]) -> None:
        request = inference_pb2.BatchRequest(batch_id=uuid.uuid4().hex, model=model, path=[self.id])
        for item in batch:
            req: inference_pb2.PredictRequest = item.payload
            request.items.add(
                request_id=item.request_id, input=req.input, deadline_unix_ms=item.deadline_ms, parameters=req.parameters
            )
        deadline = max((i.deadline_ms for i in batch), default=0) if all(i.deadline_ms for i in batch) else 0
        ctx = RequestContext(request.batch_id, deadline)
        try:
            raw = await self.bus.request(
                subjects.route(model), request.SerializeToString(), ctx, timeout_s=self.settings.request_timeout_s
            )
            response = inference_pb2.BatchResponse.FromString(raw)
            if len(response.results) != len(batch):
                raise errors.Internal(f"batch of {len(batch)} answered with {len(response.results)} results")
        except Exception as exc:
            err = errors.ensure_unimodel_error(exc)
            if not isinstance(exc, errors.UnimodelError):
                self.log.exception("dispatch of a %s batch failed", model)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(err)
            return
        path = list(response.path)
        for item, result in zip(batch, response.results):
            if not item.future.done():
                item.future.set_result((result, path))

    async def on_drain(self, timeout_s: float) -> None:
        # Bus handlers wait on their futures; the batch loops keep dispatching until queues are empty.
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while (any(len(q) for q in self.queues.values()) or self._dispatching) and loop.time() < end:
            await asyncio.sleep(0.01)

