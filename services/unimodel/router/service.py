"""router runtime: places models on workers, watches the worker instances in etcd and publishes the routing
table from which the batchers send each batch straight to a worker (core/dispatch.py).

The table (RoutingTable on subjects.ROUTING_TABLE) holds the workers with their subjects, models and slots,
the generation models, the suspended workers (a batcher that found one not answering reports it on
subjects.SUSPECT) and the workers' generation loads; it goes out on every change and every TABLE_INTERVAL_S.
A batcher that has no table yet (just started, or no router published one) sends its batches here on
subjects.route(model): the router then dispatches them itself, the same way.
"""

from __future__ import annotations

import asyncio
from typing import cast

import grpc
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg

from unimodel.core import capacity_shares, errors, modelconfig, subjects, tracing
from unimodel.core.context import RequestContext
from unimodel.core.dispatch import Dispatcher, DispatchSettings
from unimodel.core.grpc_server import maps_errors
from unimodel.core.kinds import BATCHER, WORKER_KINDS
from unimodel.core.lifecycle import Service
from unimodel.core.membership import Discovery, instances_prefix, models_prefix
from unimodel.core.routing_policy import WorkerTable
from unimodel.core.store import KeyValueStore
from unimodel.core.tracing import Attr
from unimodel.router.metrics import RouterMetrics
from unimodel.router.placement import Command, Planner
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


TABLE_INTERVAL_S = 2.0
"""The routing table is published on every change (at most every TABLE_MIN_GAP_S) and at least this often."""
TABLE_MIN_GAP_S = 0.05


class RouterService(Service):
    kind = "router"
    settings: RouterSettings

    def __init__(self, settings: RouterSettings, store: KeyValueStore | None = None) -> None:
        super().__init__(settings, store)
        self.table = WorkerTable()
        self.stats = RouterMetrics(self.metrics.registry, self._worker_states)
        self.dispatcher = Dispatcher(
            self.bus, self.table, DispatchSettings(settings.retries, settings.try_timeout_s, settings.suspend_s),
            self.stats, self.log, known=lambda: self.workers.synced.is_set(), on_suspend=lambda _w: self._table_changed.set(),
        )
        self._table_changed = asyncio.Event()
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
        self.batchers: Discovery[str] = Discovery(
            self.store, instances_prefix(settings.etcd_prefix), _batcher_id, lambda *_: self._table_changed.set()
        )
        self.planner = Planner(retry_failed_s=max(5.0, 5 * settings.reconcile_interval_s))
        self._placement_changed = asyncio.Event()
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
        self.dispatcher.generative = {c.name for c in self.models.items.values() if modelconfig.is_generative(c)}
        self._table_changed.set()
        if new is None and old is not None:
            self.log.info("model %s unregistered", old.name)
        elif new is not None:
            self.log.info("model %s registered (%s engine, replicas %s)", new.name, new.engine, new.replicas or "all")
        self._placement_changed.set()

    def _on_worker_change(
        self, key: str, old: registry_pb2.InstanceInfo | None, new: registry_pb2.InstanceInfo | None
    ) -> None:
        self._placement_changed.set()
        self._table_changed.set()
        if new is not None:
            if old is None:
                self.log.info("worker %s joined with models %s", new.id, ",".join(new.models) or "-")
            self.table.upsert(new, self.dispatcher.generative)
            return
        assert old is not None
        self.log.info("worker %s left", old.id)
        self.table.remove(old.id)
        self.dispatcher.worker_left(old.id)

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
        await self.bus.serve(subjects.ROUTING_TABLE_GET, self._on_table_request, queue=subjects.QUEUE_ROUTER)
        await self.bus.subscribe(subjects.LOAD, self._on_load)
        await self.bus.subscribe(subjects.SUSPECT, self._on_suspect)
        self.spawn(self._reconcile_loop(), name="placement")
        self.spawn(self.dispatcher.watch_acks(), name="watch workers")
        self.spawn(self._publish_tables(), name="routing table")

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
        # a trace of its own per placement command (the router's only spans: batches go straight to workers)
        span = tracing.start(tracing.Name.ROUTER_PLACE, "", tracing.CLIENT, {
            Attr.MODEL: command.model, Attr.WORKER_ID: command.worker_id, Attr.INSTANCE: self.id,
        }, root=True) if tracing.enabled() else None
        if span is not None:
            ctx = RequestContext(ctx.request_id, ctx.deadline_ms, tracing.traceparent_of(span), ctx.tracestate)
        try:
            raw = await self.bus.request(
                subjects.worker_control(command.worker_id), message.SerializeToString(), ctx,
                timeout_s=self.settings.command_timeout_s,
            )
        except errors.UnimodelError as exc:
            tracing.finish(span, exc)
            self.planner.failed(command)
            self.log.warning("%s failed: %s", command, exc.message)
            return
        tracing.finish(span)
        status = registry_pb2.ModelStatus.FromString(raw)
        self.log.info("%s: %s", command, registry_pb2.ModelStatus.State.Name(status.state))

    async def _on_batch(self, msg: Msg, ctx: RequestContext) -> bytes:
        batch = inference_pb2.BatchRequest.FromString(msg.data)
        batch.path.append(self.id)
        if not tracing.enabled():
            return _serialized(await self._route(batch, ctx))
        span, ctx = tracing.start_in(tracing.Name.ROUTER_ROUTE, ctx, tracing.SERVER, {
            Attr.MODEL: batch.model, Attr.BATCH_ID: batch.batch_id, Attr.BATCH_SIZE: len(batch.items),
            Attr.INSTANCE: self.id,
        })
        try:
            ack = await self._route(batch, ctx)
        except BaseException as exc:
            tracing.finish(span, exc)
            raise
        if span is not None:
            span.set_attribute(Attr.WORKER_ID, ack.worker_id)
            tracing.finish(span)
        return _serialized(ack)

    # the routing table ------------------------------------------------------------------------------
    def routing_table(self) -> registry_pb2.RoutingTable:
        """The table the batchers dispatch from (see the module doc)."""
        table = self.table
        now = table.clock()
        out = registry_pb2.RoutingTable(
            router_id=self.id, batchers=sorted(self.batchers.items.values())
        )
        out.workers.extend(table.instances[i] for i in sorted(table.instances))
        for worker_id, until in list(table.suspended.items()):
            if until > now:
                out.suspended_s[worker_id] = until - now
        for (worker_id, model), sequences in table.sequences.items():
            out.loads.add(worker_id=worker_id, model=model, sequences=sequences)
        return out

    async def _publish_tables(self) -> None:
        """Publish the routing table once the workers are known, then on every change (at most every
        TABLE_MIN_GAP_S) and at least every TABLE_INTERVAL_S (a batcher that starts, or missed one, has it soon)."""
        await self.workers.synced.wait()
        while True:
            self._table_changed.clear()
            try:
                await self.bus.publish(subjects.ROUTING_TABLE, self.routing_table().SerializeToString(), what="the routing table")
            except errors.UnimodelError as exc:  # NATS down: the next one goes once it is back
                self.log.debug("routing table not published: %s", exc.message)
            await asyncio.sleep(TABLE_MIN_GAP_S)
            try:
                async with asyncio.timeout(TABLE_INTERVAL_S):
                    await self._table_changed.wait()
            except TimeoutError:
                pass

    async def _on_table_request(self, msg: Msg, ctx: RequestContext) -> bytes:
        return cast(bytes, self.routing_table().SerializeToString())  # protobuf's runtime ships no type information

    async def _on_suspect(self, msg: Msg) -> None:
        """A batcher found a worker not answering a batch: suspend it here too, for the other batchers."""
        try:
            report = registry_pb2.WorkerSuspected.FromString(msg.data)
        except DecodeError:
            return
        if self.table.suspend(report.worker_id, max(0.0, min(report.for_s, self.settings.suspend_s))):
            self.log.warning("worker %s suspended for %.1fs (it did not answer %s)", report.worker_id, report.for_s, report.reporter)
            self._table_changed.set()

    async def _on_load(self, msg: Msg) -> None:
        self.dispatcher.on_load(msg.data)

    # batches of batchers that have no routing table ---------------------------------------------------
    async def _route(self, batch: inference_pb2.BatchRequest, ctx: RequestContext) -> inference_pb2.BatchAck:
        return await self.dispatcher.dispatch(
            batch.model, batch.SerializeToString(), ctx, lambda ack: self._fill_shares(ack, batch), batch
        )

    def _fill_shares(self, ack: inference_pb2.BatchAck, batch: inference_pb2.BatchRequest) -> None:
        """The model's slots, and the sending batcher's rank among the known batchers (its id is the first
        hop of the batch's path), from which it takes its share (core/capacity_shares.py)."""
        ack.capacity = self.table.capacity(batch.model)
        if len(batch.path) > 1:  # [batcher, ..., this router]: sent by a batcher
            ack.batcher_rank, ack.batchers = capacity_shares.rank(self.batchers.items.values(), batch.path[0], batch.model)


def _serialized(ack: inference_pb2.BatchAck) -> bytes:
    return cast(bytes, ack.SerializeToString())  # protobuf's runtime ships no type information


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
