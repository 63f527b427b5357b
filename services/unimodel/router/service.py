"""router runtime: watches worker instances in etcd, sends each batch to one, retries on loss.

The worker answers the batch's items directly; the router waits for its BatchAck, which tells it the
worker's load (outstanding batches) and whether the batch must go to another instance.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import cast

import grpc
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg

from unimodel.core import capacity_shares, errors, modelconfig, path_watch, subjects, tracing
from unimodel.core.context import RequestContext
from unimodel.core.grpc_server import maps_errors
from unimodel.core.kinds import BATCHER, WORKER_KINDS
from unimodel.core.lifecycle import Service
from unimodel.core.membership import Discovery, instances_prefix, models_prefix
from unimodel.core.store import KeyValueStore
from unimodel.core.tracing import Attr
from unimodel.router.metrics import BUSY, NO_WORKER, NOT_SERVED, OK, OTHER_MODEL, RETRIED, RouterMetrics
from unimodel.router.placement import Command, Planner
from unimodel.router.policy import WorkerTable
from unimodel.router.settings import RouterSettings
from unimodel.v1 import inference_pb2, model_pb2, registry_pb2, services_pb2, services_pb2_grpc


def _worker_info(raw: bytes) -> registry_pb2.InstanceInfo | None:
    """A worker's registration; None (ignored by Discovery) for the other services' instances."""
    info = registry_pb2.InstanceInfo.FromString(raw)
    return info if info.kind in WORKER_KINDS else None


def _batcher_id(raw: bytes) -> str | None:
    """A batcher's instance id; None (ignored by Discovery) for the other services' instances."""
    info = registry_pb2.InstanceInfo.FromString(raw)
    return info.id if info.kind == BATCHER else None


SYNC_WAIT_S = 10.0
"""How long a starting router waits for its first read of the workers and models before it takes batches."""


class WorkerLost(Exception):
    """The instance left (lease expired or revoked) while a batch was on it."""


_LOST = "unimodel: worker lost"
"""Cancel message for a handler task whose worker left; swallowed (uncancel) and turned into WorkerLost."""
_ACK_LOST = "unimodel: worker reconnected"
"""Cancel message for a handler task whose worker reconnected to NATS after the batch was sent (its node of a
NATS cluster died): the ack may be lost on the way; turned into AckLost, the batch is sent again."""


class AckLost(WorkerLost):
    """The worker is alive but reconnected to NATS since the batch was sent: its ack may never come."""


MAX_ACK_LOST_SENDS = 3
"""A batch whose ack was lost to a reconnect is sent again at most this many times."""


class RouterService(Service):
    kind = "router"
    settings: RouterSettings

    def __init__(self, settings: RouterSettings, store: KeyValueStore | None = None) -> None:
        super().__init__(settings, store)
        self.table = WorkerTable()
        self.stats = RouterMetrics(self.metrics.registry, self._worker_states)
        self._inflight: dict[str, set[asyncio.Task[object]]] = {}
        self._sent_at: dict[asyncio.Task[object], float] = {}  # batch waits -> time.monotonic() sent to the worker
        self.workers: Discovery[registry_pb2.InstanceInfo] = Discovery(
            self.store,
            instances_prefix(settings.etcd_prefix),
            _worker_info,
            self._on_worker_change,
        )
        self.models: Discovery[model_pb2.ModelConfig] = Discovery(
            self.store, models_prefix(settings.etcd_prefix), model_pb2.ModelConfig.FromString, self._on_model_change
        )
        # the batchers, which share each model's slots (core/capacity_shares.py)
        self.batchers: Discovery[str] = Discovery(self.store, instances_prefix(settings.etcd_prefix), _batcher_id)
        self.planner = Planner(retry_failed_s=max(5.0, 5 * settings.reconcile_interval_s))
        self._placement_changed = asyncio.Event()
        self.generative: set[str] = set()  # registered text-generation models (batches split per item)
        self.grpc.add(
            services_pb2_grpc.add_RouterServiceServicer_to_server,
            _RouterApi(self),
            services_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name,
        )

    def _worker_states(self) -> dict[str, int]:
        # Called from the metrics server's thread: reads copies, changes nothing (is_suspended would).
        ids = list(self.table.instances)
        until, now = dict(self.table.suspended), self.table.clock()
        suspended = sum(1 for i in ids if until.get(i, 0.0) > now)
        return {"ready": len(ids) - suspended, "suspended": suspended}

    def _on_model_change(
        self, key: str, old: model_pb2.ModelConfig | None, new: model_pb2.ModelConfig | None
    ) -> None:
        self.generative = {c.name for c in self.models.items.values() if modelconfig.is_generative(c)}
        if new is None and old is not None:
            self.log.info("model %s unregistered", old.name)
        elif new is not None:
            self.log.info("model %s registered (%s engine, replicas %s)", new.name, new.engine, new.replicas or "all")
        self._placement_changed.set()

    def _on_worker_change(
        self, key: str, old: registry_pb2.InstanceInfo | None, new: registry_pb2.InstanceInfo | None
    ) -> None:
        self._placement_changed.set()
        if new is not None:
            if old is None:
                self.log.info("worker %s joined with models %s", new.id, ",".join(new.models) or "-")
            self.table.upsert(new, self.generative)
            return
        assert old is not None
        self.log.info("worker %s left", old.id)
        self.table.remove(old.id)
        for task in self._inflight.pop(old.id, set()):
            task.cancel(_LOST)

    async def on_start(self) -> None:
        self.workers.start()
        self.models.start()
        self.batchers.start()
        # Join the routers' queue group once the workers and models are known (a router that takes batches
        # before would answer "not discovered workers yet" for batches a running router could place);
        # with etcd unreachable, after SYNC_WAIT_S anyway.
        synced = asyncio.gather(self.workers.synced.wait(), self.models.synced.wait())
        try:
            await asyncio.wait_for(synced, SYNC_WAIT_S)
        except TimeoutError:
            self.log.warning("etcd not read within %.0fs: taking batches before the workers are known", SYNC_WAIT_S)
        await self.bus.serve(subjects.ROUTE_ALL, self._on_batch, queue=subjects.QUEUE_ROUTER)
        await self.bus.subscribe(subjects.LOAD, self._on_load)
        self.spawn(self._reconcile_loop(), name="placement")
        self.spawn(self._watch_workers(), name="watch workers")

    async def on_close(self) -> None:
        await self.workers.stop()
        await self.models.stop()
        await self.batchers.stop()

    # placement ------------------------------------------------------------------------------------
    async def _reconcile_loop(self) -> None:
        """Bring workers to the desired placement: on every etcd change, and every interval (a lost
        command or a failed load is retried)."""
        await self.workers.synced.wait()
        await self.models.synced.wait()
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task[None]] = set()
        while True:
            self._placement_changed.clear()
            configs = {c.name: c for c in self.models.items.values()}
            workers = {info.id: info for info in self.workers.items.values()}
            now = loop.time()
            for command in self.planner.plan(configs, workers, now):
                self.planner.sent(command, now)
                task = asyncio.create_task(self._command(command))
                pending.add(task)
                task.add_done_callback(pending.discard)
            try:
                async with asyncio.timeout(self.settings.reconcile_interval_s):
                    await self._placement_changed.wait()
            except TimeoutError:
                pass

    async def _command(self, command: Command) -> None:
        info = self.table.instances.get(command.worker_id) or next(
            (i for i in self.workers.items.values() if i.id == command.worker_id), None
        )
        if info is None:
            return
        message = (
            registry_pb2.ModelCommand(load=command.load)
            if command.load is not None
            else registry_pb2.ModelCommand(unload=command.model)
        )
        ctx = RequestContext.new(self.settings.command_timeout_s)
        try:
            raw = await self.bus.request(
                subjects.worker_control(command.worker_id), message.SerializeToString(), ctx,
                timeout_s=self.settings.command_timeout_s,
            )
        except errors.UnimodelError as exc:
            self.planner.failed(command)
            self.log.warning("%s failed: %s", command, exc.message)
            return
        status = registry_pb2.ModelStatus.FromString(raw)
        self.log.info("%s: %s", command, registry_pb2.ModelStatus.State.Name(status.state))

    async def _on_batch(self, msg: Msg, ctx: RequestContext) -> bytes:
        batch = inference_pb2.BatchRequest.FromString(msg.data)
        batch.path.append(self.id)
        if not tracing.enabled():
            return await self._route(batch, ctx)
        span, ctx = tracing.start_in(tracing.Name.ROUTER_ROUTE, ctx, tracing.SERVER, {
            Attr.MODEL: batch.model, Attr.BATCH_ID: batch.batch_id, Attr.BATCH_SIZE: len(batch.items),
            Attr.INSTANCE: self.id,
        })
        try:
            raw = await self._route(batch, ctx)
        except BaseException as exc:
            tracing.finish(span, exc)
            raise
        if span is not None:
            span.set_attribute(Attr.WORKER_ID, inference_pb2.BatchAck.FromString(raw).worker_id)
            tracing.finish(span)
        return raw

    async def _route(self, batch: inference_pb2.BatchRequest, ctx: RequestContext) -> bytes:
        if batch.model in self.generative:
            return await self._route_generation(batch, ctx)
        model = batch.model
        return await self._dispatch(batch, ctx, lambda _attempt, tried: self.table.pick(model, exclude=tried))

    async def _dispatch(
        self,
        batch: inference_pb2.BatchRequest,
        ctx: RequestContext,
        choose: Callable[[int, list[str]], str | None],
        *,
        track_load: bool = False,
    ) -> bytes:
        """Send `batch` to the worker `choose(attempt, tried)` names; a worker that is lost or does not
        answer is suspended and the next choice tried, up to `retries` more times. The ack carries the
        model's capacity and the sending batcher's rank among the batchers that share it; with `track_load`,
        the worker's reported load is recorded (generations). A worker whose slots of the model were all
        taken (ack.busy: nothing ran) is not suspended: the next choice is tried, and when every one was
        busy the busy ack goes back to the batcher, which sends the batch again shortly."""
        model = batch.model
        label = model if self.table.serves(model) else OTHER_MODEL
        arrived = time.perf_counter()
        tried: list[str] = []
        busy: inference_pb2.BatchAck | None = None
        lost = resent = 0
        while lost <= self.settings.retries:
            before = time.perf_counter()
            worker_id = choose(len(tried), tried)
            self.stats.decision.observe(time.perf_counter() - before)
            if worker_id is None or worker_id in tried:
                break
            tried.append(worker_id)
            try:
                raw = await self._send(worker_id, batch, ctx)
            except AckLost as exc:  # alive: sent again (to it or another), neither suspended nor a failure
                resent += 1
                if resent <= MAX_ACK_LOST_SENDS:
                    tried.remove(worker_id)
                    self.log.warning("%s; sending the batch again", exc)
                continue
            except (WorkerLost, errors.Unavailable) as exc:
                lost += 1
                if self.table.suspend(worker_id, self.settings.suspend_s):
                    self.log.warning("%s did not answer (%s); suspended for %.1fs", worker_id, exc, self.settings.suspend_s)
                continue
            ack = inference_pb2.BatchAck.FromString(raw)
            self._fill_shares(ack, batch)
            if ack.busy:
                busy = ack
                continue
            if track_load:
                self.table.set_load(worker_id, model, ack.load)
            self.stats.batch(label, RETRIED if len(tried) > 1 else OK, time.perf_counter() - arrived)
            return cast(bytes, ack.SerializeToString())  # protobuf's runtime ships no type information
        if busy is not None:
            self.stats.batch(label, BUSY, time.perf_counter() - arrived)
            return cast(bytes, busy.SerializeToString())  # protobuf's runtime ships no type information
        if tried:
            self.stats.batch(label, NO_WORKER, time.perf_counter() - arrived)
            raise errors.Unavailable(
                f"no instance of {model!r} could run the batch (tried {', '.join(tried)})", retry_after_s=1, model=model
            )
        if self.table.instances or self.workers.synced.is_set():
            self.stats.batch(label, NOT_SERVED, time.perf_counter() - arrived)
            raise errors.NotFound(f"model {model!r} is not served by any worker", model=model)
        self.stats.batch(label, NO_WORKER, time.perf_counter() - arrived)
        raise errors.Unavailable("router has not discovered workers yet", retry_after_s=1)

    def _fill_shares(self, ack: inference_pb2.BatchAck, batch: inference_pb2.BatchRequest) -> None:
        """The model's slots, and the sending batcher's rank among the known batchers (its id is the first
        hop of the batch's path), from which it takes its share (core/capacity_shares.py)."""
        ack.capacity = self.table.capacity(batch.model)
        if len(batch.path) > 1:  # [batcher, ..., this router]: sent by a batcher
            ack.batcher_rank, ack.batchers = capacity_shares.rank(self.batchers.items.values(), batch.path[0], batch.model)

    async def _watch_workers(self) -> None:
        """While a batch has waited over path_watch.STALL_S for a worker's ack, ask the workers holding
        batches whether they reconnected to NATS since (core/path_watch.py): one whose node of a NATS
        cluster died may have lost the ack on the way, so the batches sent to it before are sent again
        (AckLost: to it or another, not a suspension), instead of waiting try_timeout_s with the batcher's
        slot held. A worker that does not answer at all is left to its lease (`_on_worker_change`): while
        it moves to another node it does not answer either. Generation batches are left alone (acked as
        soon as they start; a generation must not run twice)."""
        watch = path_watch.PathWatch(
            lambda i: self.bus.alive(i, path_watch.PROBE_TIMEOUT_S), path_watch.STALL_S, probe_gone_again=True
        )
        while True:
            await asyncio.sleep(path_watch.INTERVAL_S)
            holding = {w: tasks for w, tasks in self._inflight.items() if tasks}
            oldest = min((self._sent_at.get(t, math.inf) for tasks in holding.values() for t in tasks), default=math.inf)
            found = await watch.check(None if oldest == math.inf else oldest, holding)
            for worker_id in found:
                reconnected = watch.reconnected.get(worker_id)
                if reconnected is None:
                    continue
                for task in list(self._inflight.get(worker_id, ())):
                    if self._sent_at.get(task, math.inf) < reconnected:
                        task.cancel(_ACK_LOST)

    async def _on_load(self, msg: Msg) -> None:
        """A worker's generation ended: its sequence count for the model, as it is now."""
        try:
            load = registry_pb2.ModelLoad.FromString(msg.data)
        except DecodeError:
            return
        self.table.set_load(load.worker_id, load.model, load.sequences)

    async def _route_generation(self, batch: inference_pb2.BatchRequest, ctx: RequestContext) -> bytes:
        """A generation batch: each item to its conversation's home worker while load allows (policy
        pick_affine), the parts sent side by side, one ack for the batcher."""
        model = batch.model
        parts: dict[str, inference_pb2.BatchRequest] = {}
        for index, item in enumerate(batch.items):
            worker_id = self.table.pick_affine(model, item.generate.session)
            if worker_id is None:
                return await self._route_batch(batch, ctx)  # no instance known: the plain path's errors
            part = parts.get(worker_id)
            if part is None:
                part = parts[worker_id] = inference_pb2.BatchRequest(batch_id=batch.batch_id, model=model, path=batch.path)
            part.items.append(item)
            if len(batch.queue_ns) == len(batch.items):
                part.queue_ns.append(batch.queue_ns[index])
            self.table.add_load(worker_id, model, 1)  # seen by the next item's choice
        if len(parts) == 1:
            ((worker_id, part),) = parts.items()
            return await self._route_batch(part, ctx, first=worker_id)
        acks = await asyncio.gather(*(self._route_batch(p, ctx, first=w) for w, p in parts.items()), return_exceptions=True)
        merged = inference_pb2.BatchAck(batch_id=batch.batch_id)
        self._fill_shares(merged, batch)
        first_error: BaseException | None = None
        for part, ack in zip(parts.values(), acks, strict=True):
            if isinstance(ack, BaseException):
                first_error = first_error or ack
                merged.failed += len(part.items)
                continue
            a = inference_pb2.BatchAck.FromString(ack)
            merged.succeeded += a.succeeded
            merged.failed += a.failed
            merged.worker_id = merged.worker_id or a.worker_id
        if first_error is not None and merged.succeeded == 0 and merged.failed == len(batch.items):
            raise first_error
        return cast(bytes, merged.SerializeToString())  # protobuf's runtime ships no type information

    async def _route_batch(self, batch: inference_pb2.BatchRequest, ctx: RequestContext, first: str = "") -> bytes:
        """Send a (part of a) generation batch to `first`, retrying on another worker if it is lost."""
        model = batch.model

        def choose(attempt: int, tried: list[str]) -> str | None:
            return first if attempt == 0 and first else self.table.pick_affine(model, "", exclude=tried)

        return await self._dispatch(batch, ctx, choose, track_load=True)

    async def _send(self, worker_id: str, batch: inference_pb2.BatchRequest, ctx: RequestContext) -> bytes:
        """Request/reply with one worker, in the handler's own task (no extra task per batch): if the
        worker leaves meanwhile, `_on_worker_change` cancels this task with _LOST, turned into WorkerLost."""
        info = self.table.instances[worker_id]
        task = asyncio.current_task()
        assert task is not None
        inflight = self._inflight.setdefault(worker_id, set())
        inflight.add(task)
        if batch.model not in self.generative:  # a generation is never sent twice: its ack is not watched
            self._sent_at[task] = time.monotonic()
        self.table.begin(worker_id)
        try:
            return await self.bus.request(
                info.nats_subject, batch.SerializeToString(), ctx, timeout_s=self.settings.try_timeout_s
            )
        except asyncio.CancelledError as exc:
            if exc.args == (_LOST,) and task.uncancel() == 0:
                raise WorkerLost(f"worker {worker_id} left") from None
            if exc.args == (_ACK_LOST,) and task.uncancel() == 0:
                raise AckLost(f"worker {worker_id} reconnected to NATS while it held the batch") from None
            raise
        finally:
            self.table.end(worker_id)
            inflight.discard(task)
            self._sent_at.pop(task, None)


class _RouterApi(services_pb2_grpc.RouterServiceServicer):
    def __init__(self, router: RouterService) -> None:
        self.router = router

    @maps_errors
    async def ListInstances(  # noqa: N802  (gRPC method names are CamelCase)
        self, request: services_pb2.ListInstancesRequest, context: grpc.aio.ServicerContext
    ) -> services_pb2.ListInstancesResponse:
        out = services_pb2.ListInstancesResponse()
        for iid, info in sorted(self.router.table.instances.items()):
            if request.kind and info.kind != request.kind:
                continue
            out.instances.add(info=info, outstanding=self.router.table.outstanding.get(iid, 0))
        return out
