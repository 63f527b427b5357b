"""batcher runtime: NATS queue group on every model's batch subject, one batch loop per model.

A request's answer does not come back through the batcher: each item carries its caller's inbox, and
the worker answers there. The batcher answers a caller itself only when the request never reaches a
worker: its queue is full, it expired while queued, or the batch could not be routed.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from typing import NamedTuple

from nats.aio.msg import Msg

from unimodel.batcher.queue import BatchPolicy, ModelQueue, Pending
from unimodel.batcher.settings import BatcherSettings
from unimodel.core import errors, subjects
from unimodel.core.context import RequestContext
from unimodel.core.lifecycle import Service
from unimodel.v1 import inference_pb2


class Queued(NamedTuple):
    """What a queued request carries besides its id and deadline (Pending.payload)."""

    request: inference_pb2.PredictRequest
    reply_to: str  # the caller's inbox: the worker answers there
    ctx: RequestContext


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
        self._error_replies: set[asyncio.Task[None]] = set()

    async def on_start(self) -> None:
        # The handler only enqueues (never waits), so it runs inline: no task per request.
        await self.bus.serve(subjects.BATCH_ALL, self._on_request, queue=subjects.QUEUE_BATCHER, inline=True)

    def _queue(self, model: str) -> ModelQueue:
        queue = self.queues.get(model)
        if queue is None:
            queue = self.queues[model] = ModelQueue(model, self.policy)
            self.spawn(self._batch_loop(queue), name=f"batch loop {model}")
        return queue

    async def _on_request(self, msg: Msg, ctx: RequestContext) -> None:
        if not msg.reply:
            return None  # nobody waits for an answer: nothing to run
        request = inference_pb2.PredictRequest.FromString(msg.data)
        model = subjects.model_of(msg.subject)
        if request.model and request.model != model:
            raise errors.InvalidArgument(f"request for {request.model!r} sent on the subject of {model!r}")
        pending = Pending(ctx.request_id, Queued(request, msg.reply, ctx), ctx.deadline_ms)
        self._queue(model).put(pending)  # a full queue raises: the bus answers RESOURCE_EXHAUSTED
        pending.future.add_done_callback(functools.partial(self._on_item_done, msg.reply))
        return None

    def _on_item_done(self, reply_to: str, future: asyncio.Future[None]) -> None:
        """An item that failed before reaching a worker: tell its caller why."""
        if future.cancelled() or future.exception() is None:
            return
        err = errors.ensure_unimodel_error(future.exception())  # type: ignore[arg-type]
        task = asyncio.create_task(self.bus.publish_error(reply_to, err))
        self._error_replies.add(task)
        task.add_done_callback(self._error_replies.discard)

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
            queued: Queued = item.payload
            request.items.add(
                request_id=item.request_id,
                input=queued.request.input,
                deadline_unix_ms=item.deadline_ms,
                parameters=queued.request.parameters,
                reply_to=queued.reply_to,
                trace_context=queued.ctx.trace_headers(),
            )
        deadline = max(i.deadline_ms for i in batch) if all(i.deadline_ms for i in batch) else 0
        first: RequestContext = batch[0].payload.ctx
        ctx = RequestContext(request.batch_id, deadline, first.traceparent, first.tracestate)
        try:
            await self.bus.request(
                subjects.route(model), request.SerializeToString(), ctx, timeout_s=self.settings.request_timeout_s
            )
        except Exception as exc:
            err = errors.ensure_unimodel_error(exc)
            if not isinstance(exc, errors.UnimodelError):
                self.log.exception("dispatch of a %s batch failed", model)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(err)
            return
        for item in batch:
            if not item.future.done():
                item.future.set_result(None)

    async def on_drain(self, timeout_s: float) -> None:
        # The batch loops keep dispatching until the queues are empty and every batch is acknowledged.
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while (any(len(q) for q in self.queues.values()) or self._dispatching) and loop.time() < end:
            await asyncio.sleep(0.01)
        if self._error_replies:
            await asyncio.wait(set(self._error_replies), timeout=max(0.1, end - loop.time()))
