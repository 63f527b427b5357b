"""batcher runtime: NATS queue group on every model's batch subject, one queue + scheduler per model.

The gateway sends one BatchItem per request on subjects.batch(model) (queue group "batcher", so
replicas share the load). The batcher sets the item's reply_to (the caller's inbox) and, when the item
has none, its deadline; queues it under the model's batching policy (its registered ModelConfig, watched
in etcd, or this service's defaults); and sends each batch as a BatchRequest straight to a worker, chosen from
the routing table the routers publish (core/dispatch.py: least outstanding work with two random choices,
generations by conversation affinity, another worker when one is lost). Until it has a table, or for a model
the table does not list yet, it sends the batch to a router, which dispatches it the same way.

A request's answer does not come back through the batcher: the worker answers each item at its
reply_to. The batcher answers a caller itself only when the request never reaches a worker: the queue is
full (RESOURCE_EXHAUSTED + Retry-After), it has more rows than the model's max_batch_size
(INVALID_ARGUMENT), it expired while queued (DEADLINE_EXCEEDED, at the moment it expires), or its batch
could not be dispatched (the error, for every request of the batch).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
import uuid
from dataclasses import dataclass, field
from typing import NamedTuple, cast

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg

from unimodel.batcher import wire
from unimodel.batcher.api import BatcherApi
from unimodel.batcher.metrics import EXPIRED, INVALID, OTHER_MODEL, QUEUE_FULL, BatcherMetrics, ModelSeries
from unimodel.batcher.queue import BatchPolicy, ModelQueue, Pending
from unimodel.batcher.scheduler import Scheduler
from unimodel.batcher.settings import BatcherSettings
from unimodel.core import capacity_shares, errors, modelconfig, path_watch, payload_limits, subjects, tracing
from unimodel.core.bus import NoResponders
from unimodel.core.context import RequestContext
from unimodel.core.dispatch import Dispatcher, DispatchSettings
from unimodel.core.kinds import ROUTER
from unimodel.core.lifecycle import Service
from unimodel.core.membership import Discovery, instances_prefix, model_key
from unimodel.core.routing_policy import WorkerTable
from unimodel.core.store import KeyValueStore
from unimodel.core.subjects import Header
from unimodel.core.tracing import Attr, Span
from unimodel.v1 import inference_pb2, model_pb2, registry_pb2, services_pb2, services_pb2_grpc

_REASONS: dict[type[errors.UnimodelError], str] = {
    errors.ResourceExhausted: QUEUE_FULL,
    errors.DeadlineExceeded: EXPIRED,
    errors.InvalidArgument: INVALID,
}


_REROUTE = "unimodel: router gone"
"""Cancel message for a batch's wait on a router that is gone, or on anyone after this batcher's NATS reconnect;
the batch is sent again (`_route`)."""
MAX_ROUTE_SENDS = 3
NO_ROUTER_RETRY_S = 0.25
NO_ROUTER_WAIT_S = 3.0
"""A batch that found no router subscribed is tried again every NO_ROUTER_RETRY_S for up to NO_ROUTER_WAIT_S
(routers restarting, NATS just reconnected), while its deadline allows; then its requests get the error."""


def _router_id(raw: bytes) -> str | None:
    """A router's instance id (Discovery leaves the other services' registrations out)."""
    info = registry_pb2.InstanceInfo.FromString(raw)
    return info.id if info.kind == ROUTER else None


class Shares(NamedTuple):
    """A router's last word on a model (BatchAck): its slots, the batchers sharing them, this one's rank."""

    slots: int
    batchers: int
    rank: int


TABLE_ASK_S = 1.0
"""How long a starting batcher waits for a router's answer with the routing table before it takes requests."""

BUSY_PAUSE_S = 0.001
BUSY_PAUSE_MAX_S = 0.025
"""A batch the workers answered busy is sent again after BUSY_PAUSE_S, doubling up to BUSY_PAUSE_MAX_S."""


class Abandoned(Exception):
    """A generation batch's wait on a router that is gone ended; nobody is answered (the gateway re-sends)."""


class Item(NamedTuple):
    """What a queued request carries to its batch (Pending.payload)."""

    data: bytes  # the BatchItem as received, with reply_to (and deadline) appended: never re-encoded
    reply_to: str  # the caller's inbox: the worker answers there
    deadline_ms: int
    traceparent: str  # the caller's (its span's) trace context
    tracestate: str
    span: Span | None  # "batcher queue", while tracing is on: from arrival to dispatch
    held: int = 0  # bytes of the item's content held by its caller (BatchItem.blob, core/blobs.py): it goes alone


@dataclass(slots=True, eq=False)
class ModelState:
    model: str
    subject: str
    label: str  # metrics label: the model's name when registered, else OTHER_MODEL
    series: ModelSeries
    scheduler: Scheduler[Item] = field(init=False)
    turn: asyncio.TimerHandle | None = None  # the next turn of a model with fewer slots than batchers


class BatcherService(Service):
    kind = "batcher"
    settings: BatcherSettings

    def __init__(self, settings: BatcherSettings, store: KeyValueStore | None = None) -> None:
        super().__init__(settings, store)
        self.defaults = BatchPolicy(
            max_rows=settings.max_batch_size,
            max_queue_delay_s=settings.max_queue_delay_ms / 1000.0,
            max_queue_size=settings.max_queue_size,
            max_queue_share=settings.max_queue_share,
        )
        self.policies: dict[str, BatchPolicy] = {}  # registered models
        self.queues: dict[str, ModelState] = {}  # by batch subject
        self._models_prefix = model_key(settings.etcd_prefix, "")
        self.models: Discovery[model_pb2.ModelConfig] = Discovery(
            self.store, self._models_prefix, model_pb2.ModelConfig.FromString, self._on_model_change
        )
        self.stats = BatcherMetrics(self.metrics.registry, self._queue_stats)
        self._path = (self.id,)
        # batch ids: this instance's random prefix and a counter (no urandom call per batch)
        self._batch_ids = (f"{uuid.uuid4().hex[:16]}{n:08x}" for n in itertools.count())
        self._replies: set[asyncio.Task[None]] = set()
        self._shares: dict[str, Shares] = {}  # model -> the router's last word on its slots and our rank
        self.generative: set[str] = set()  # registered text-generation models (also the dispatcher's)
        self.routers: Discovery[str] = Discovery(self.store, instances_prefix(settings.etcd_prefix), _router_id)
        self._routing: dict[asyncio.Task[object], float] = {}  # waits for a router's ack -> time.monotonic() sent
        self._direct: dict[asyncio.Task[object], float] = {}  # waits for a worker's ack -> time.monotonic() sent
        # the routing table (core/dispatch.py): the workers, from the routers' RoutingTable messages
        self.table = WorkerTable()
        self.dispatcher = Dispatcher(
            self.bus, self.table, DispatchSettings(settings.retries, settings.try_timeout_s, settings.suspend_s),
            self.stats.dispatch, self.log, known=lambda: True, on_suspend=self._suspected, owned=self._owned,
        )
        self.dispatcher.generative = self.generative  # one set: the model configs in etcd say which
        self._table_from = ""  # the router whose table was applied last ("" none yet: batches go to routers)
        self._batchers: list[str] = []  # the batchers sharing the models' slots, from the table
        self.bus.on_reconnect = self._bus_reconnected
        self.grpc.add(
            services_pb2_grpc.add_BatcherServiceServicer_to_server,
            BatcherApi(self),
            services_pb2.DESCRIPTOR.services_by_name["BatcherService"].full_name,
        )

    async def on_start(self) -> None:
        self.models.start()
        self.routers.start()
        self.spawn(self._sweep_idle(), name="idle queue sweep")
        self.spawn(self._watch_routers(), name="watch routers")
        self.spawn(self.dispatcher.watch_acks(), name="watch workers")
        await self.bus.subscribe(subjects.ROUTING_TABLE, self._on_table)
        await self.bus.subscribe(subjects.LOAD, self._on_load)
        await self._ask_table()
        # The handler only enqueues (never waits), so it runs inline: no task per request.
        await self.bus.serve(subjects.BATCH_ALL, self._on_item, queue=subjects.QUEUE_BATCHER, inline=True)
        await self.bus.serve(subjects.BUNDLE_ALL, self._on_bundle, queue=subjects.QUEUE_BATCHER, inline=True)

    # model configs ------------------------------------------------------------------------------
    def policy(self, model: str) -> BatchPolicy:
        return self.policies.get(model, self.defaults)

    def _on_model_change(
        self, key: str, old: model_pb2.ModelConfig | None, new: model_pb2.ModelConfig | None
    ) -> None:
        name = key[len(self._models_prefix) :]
        if new is None:
            self.policies.pop(name, None)
            self.generative.discard(name)
            self.log.info("model %s unregistered: default batching", name)
        else:
            if modelconfig.is_generative(new):
                self.generative.add(name)
            else:
                self.generative.discard(name)
            try:
                self.policies[name] = BatchPolicy.from_config(new, self.defaults)
            except ValueError as exc:
                self.log.warning("model %s: unusable batching config (%s); keeping the previous policy", name, exc)
                return
            p = self.policies[name]
            self.log.info(
                "model %s: max_batch_size %d%s, max_queue_delay %.1f ms, preferred %s, queue %d, %d priority levels",
                name, p.max_rows, "" if p.batching else " (no batching)", p.max_queue_delay_s * 1000,
                list(p.preferred_batch_sizes) or "-", p.max_queue_size, p.priority_levels,
            )
        state = self.queues.get(subjects.batch(name))
        if state is not None:
            state.label = self._label(name)
            state.series = self.stats.series(state.label)
            state.scheduler.set_policy(self.policy(name))  # applies to the next batch

    def _label(self, model: str) -> str:
        return model if model in self.policies else OTHER_MODEL

    # the request path ---------------------------------------------------------------------------
    def _open(self, subject: str) -> ModelState:
        model = subjects.model_of(subject)
        label = self._label(model)
        state = ModelState(model, subject, label, self.stats.series(label))
        policy = self.policy(model)
        state.scheduler = Scheduler(
            ModelQueue(model, policy),
            functools.partial(self._dispatch, state),
            functools.partial(self._reject, state),
            self._inflight_cap(model, policy),
        )
        self.queues[subject] = state
        return state

    def _inflight_cap(self, model: str, policy: BatchPolicy) -> int:
        """Batches of the model to keep in flight. A model that batches: this batcher's share of the slots
        of its instances (the batches they run at once, shared among the batchers: core/capacity_shares.py;
        1 until the router's first ack), so under load the next batch fills while they are busy, and all
        batchers together never send more than the slots. 0 while a model with fewer slots than batchers
        waits for this batcher's turn. A generation batch is acked as soon as its sequences started: up to
        the instances' sequence slots. A model that takes one row per batch gains nothing from waiting: up
        to max_inflight_batches, so the hops of one request overlap another's execution."""
        limit = self.settings.max_inflight_batches
        if policy.max_rows <= 1:
            return limit
        shares = self._shares.get(model)
        if shares is None:
            return 1
        if model in self.generative:
            return max(1, min(shares.slots, limit))
        return min(capacity_shares.share(shares.slots, shares.batchers, shares.rank, time.time()), limit)

    def _learn_shares(self, state: ModelState, ack: inference_pb2.BatchAck) -> None:
        """Take the slots and rank of a router's ack, and apply this batcher's share from now on."""
        if ack.capacity > 0:
            self._shares[state.model] = Shares(ack.capacity, ack.batchers, ack.batcher_rank)
        self._apply_share(state)

    def _apply_share(self, state: ModelState) -> None:
        """Set the model's in-flight limit to this batcher's share now; with fewer slots than batchers,
        again at the next turn while the queue lives (one timer per model)."""
        state.scheduler.set_max_inflight(self._inflight_cap(state.model, state.scheduler.queue.policy))
        shares = self._shares.get(state.model)
        if state.turn is not None or shares is None or state.model in self.generative:
            return
        now = time.time()
        at = capacity_shares.next_turn(shares.slots, shares.batchers, now)
        if at is not None and self.queues.get(state.subject) is state:
            state.turn = asyncio.get_running_loop().call_later(at - now, self._next_turn, state)

    def _next_turn(self, state: ModelState) -> None:
        state.turn = None
        self._apply_share(state)

    async def _on_item(self, msg: Msg, ctx: RequestContext) -> None:
        reply_to = msg.reply
        if not reply_to:
            return None  # nobody waits for an answer: nothing to run
        state = self.queues.get(msg.subject) or self._open(msg.subject)
        try:
            item = wire.decode_item(msg.data)
        except DecodeError:
            self.stats.reject(state.label, INVALID)
            raise errors.InvalidArgument(wire.UNDECODABLE, model=state.model) from None  # the bus answers msg.reply
        # errors go back to the bus, which answers the caller with them (429 + Retry-After, ...)
        self._enqueue(state, msg.data, item, reply_to, ctx, has_deadline_header=bool(msg.headers and Header.DEADLINE in msg.headers))
        return None

    async def _on_bundle(self, msg: Msg, ctx: RequestContext) -> None:
        """An ItemBundle: each item as if it had come alone on the model's batch subject, answered at its
        own reply_to when it cannot be queued."""
        batch_subject = subjects.batch(subjects.model_of(msg.subject))
        state = self.queues.get(batch_subject) or self._open(batch_subject)
        try:
            parts = inference_pb2.EncodedItemBundle.FromString(msg.data).items
        except DecodeError:
            self.stats.reject(state.label, INVALID)
            raise errors.InvalidArgument("bundle subject payload is not an ItemBundle", model=state.model) from None
        for data in parts:
            try:
                item = wire.decode_item(data)
            except DecodeError:  # answered at the reply_to read from its top-level fields: never dropped
                self.stats.reject(state.label, INVALID)
                reply_to = wire.reply_to_of(data)
                if reply_to:
                    await self.bus.publish_error(reply_to, errors.InvalidArgument(wire.UNDECODABLE, model=state.model))
                continue
            if not item.reply_to:
                continue
            try:
                self._enqueue(state, data, item, item.reply_to, ctx, has_deadline_header=False)
            except errors.UnimodelError as exc:
                await self.bus.publish_error(item.reply_to, exc)
        return None

    def _enqueue(
        self, state: ModelState, data: bytes, item: inference_pb2.BatchItem, reply_to: str, ctx: RequestContext,
        *, has_deadline_header: bool,
    ) -> None:
        """Queue one item under its model's policy; raises the queue's errors (counted here)."""
        scheduler = state.scheduler
        deadline_ms = item.deadline_unix_ms
        expires = deadline_ms / 1000.0
        if deadline_ms <= 0:
            deadline_ms = ctx.deadline_ms  # the header's deadline, else this hop's default timeout
            expires = deadline_ms / 1000.0
            timeout = scheduler.queue.policy.default_timeout_s
            if timeout and not has_deadline_header:
                expires = min(expires, time.time() + timeout)  # the model's queue timeout
        request_id = item.request_id or ctx.request_id
        # The item goes on as received plus the fields it lacks (protobuf: appended fields are merged).
        # The gateway sets request_id and trace_context itself; the headers fill them in otherwise.
        carried = item.trace_context
        traceparent = carried.get(Header.TRACEPARENT, "") or ctx.traceparent
        tracestate = carried.get(Header.TRACESTATE, "") if carried else ctx.tracestate
        added = wire.item_fields(
            "" if item.reply_to == reply_to else reply_to,
            deadline_ms if deadline_ms != item.deadline_unix_ms else 0,
            "" if item.request_id else request_id,
            ctx.trace_headers() if ctx.traceparent and not carried else None,
        )
        span = tracing.start(
            tracing.Name.BATCHER_QUEUE, traceparent, tracing.CONSUMER,
            {Attr.MODEL: state.model, Attr.REQUEST_ID: request_id, Attr.INSTANCE: self.id},
        ) if tracing.enabled() else None
        pending = Pending(
            request_id,
            Item(data + added, reply_to, deadline_ms, traceparent, tracestate, span, item.blob.size),
            rows=item.rows,
            priority=item.priority,
            expires=expires,
            tenant=item.tenant,
        )
        try:
            scheduler.submit(pending)
        except errors.UnimodelError as exc:
            tracing.finish(span, exc)
            reason = _REASONS.get(type(exc))
            if reason:
                self.stats.reject(state.label, reason)
            raise

    async def _dispatch(self, state: ModelState, batch: list[Pending[Item]]) -> None:
        runs = payload_limits.chunks(
            [p.payload.held or len(p.payload.data) for p in batch], self.bus.message_limit, payload_limits.BLOB_BYTES
        )
        if len(runs) > 1:  # too big for one bus message together, or held by reference: several batches, a big item alone
            await asyncio.gather(*(self._dispatch(state, [batch[i] for i in run]) for run in runs))
            return
        now = time.time()
        series = state.series
        wait = series.queue_wait
        parts = []
        waits = []
        rows = deadline = 0
        for pending in batch:
            item = pending.payload
            parts.append(item.data)
            rows += pending.rows
            if item.deadline_ms > deadline:
                deadline = item.deadline_ms
            waited = now - pending.enqueued
            wait.observe(waited)
            waits.append(int(waited * 1e9))
        series.batch_rows.observe(rows)
        series.fill_ratio.observe(rows / state.scheduler.queue.policy.max_rows)
        batch_id = next(self._batch_ids)
        first = batch[0].payload
        ctx = RequestContext(batch_id, deadline, first.traceparent, first.tracestate)
        span, dispatched_ns = None, 0
        traced = tracing.enabled()
        if traced:
            span, ctx = self._trace_batch(state, batch, batch_id, rows, ctx)
            dispatched_ns = time.time_ns()
        try:
            await self._send_admitted(state, wire.batch_request(batch_id, state.model, self._path, parts, waits), deadline, ctx)
        except Abandoned:
            series.batches_failed += 1
            if traced:
                self._end_queue_spans(batch, batch_id, rows, waits, span, dispatched_ns)
                tracing.finish(span)
            return
        except Exception as exc:  # a failed batch fails every request in it, with the cause
            err = errors.ensure_unimodel_error(exc)
            if not isinstance(exc, errors.UnimodelError):
                self.log.exception("dispatch of a %s batch failed", state.model)
            series.batches_failed += 1
            if traced:
                self._end_queue_spans(batch, batch_id, rows, waits, span, dispatched_ns)
                tracing.finish(span, err)
            for pending in batch:
                await self.bus.publish_error(pending.payload.reply_to, err)
            return
        if traced:  # after the ack: the requests' answers are on their way already
            self._end_queue_spans(batch, batch_id, rows, waits, span, dispatched_ns)
            tracing.finish(span)
        series.batches_ok += 1

    async def _send_admitted(self, state: ModelState, payload: bytes, deadline_ms: int, ctx: RequestContext) -> None:
        """Send a batch until a worker takes it. Every ack brings the model's slots and this batcher's rank:
        its share applies from now on. A busy ack (every instance's slots of the model were taken: the
        batchers' views of their shares differed for a moment, core/capacity_shares.py; nothing ran) sends
        the same batch again after a short pause, until its deadline."""
        pause = BUSY_PAUSE_S
        give_up = deadline_ms / 1000 if deadline_ms else time.time() + self.settings.request_timeout_s
        while True:
            ack = await self._route(state.model, payload, ctx)
            self._learn_shares(state, ack)
            if not ack.busy:
                return
            state.series.batches_busy += 1
            if time.time() + pause >= give_up:
                raise errors.Unavailable(
                    f"every instance of {state.model!r} stayed busy until the requests' deadline", retry_after_s=1,
                    model=state.model,
                )
            await asyncio.sleep(pause)
            pause = min(2 * pause, BUSY_PAUSE_MAX_S)

    async def _route(self, model: str, payload: bytes, ctx: RequestContext) -> inference_pb2.BatchAck:
        """Send a batch to a worker from the routing table (core/dispatch.py), or, without a table or for a model
        it does not list, to the routers (queue group), and wait for the ack. A wait cut short (`_REROUTE`: a
        router that held it is gone, or this batcher reconnected to NATS and the ack may be lost) sends the batch
        again, up to MAX_ROUTE_SENDS times in all: inference is idempotent, the first answer of each request
        wins. A generation batch is never sent twice (a generation must not run twice): its wait ends
        (Abandoned) and the gateways, which watch batchers and routers too, send each generation no worker
        accepted again under a new id."""
        task = asyncio.current_task()
        assert task is not None
        generation = model in self.generative
        sends = 1
        give_up = time.monotonic() + NO_ROUTER_WAIT_S
        while True:
            direct = bool(self._table_from) and self.table.serves(model)
            waits = self._direct if direct else self._routing
            waits[task] = time.monotonic()
            try:
                if direct:
                    return await self.dispatcher.dispatch(model, payload, ctx, functools.partial(self._fill_shares, model))
                raw = await self.bus.request(subjects.route(model), payload, ctx, timeout_s=self.settings.request_timeout_s)
                return cast(inference_pb2.BatchAck, inference_pb2.BatchAck.FromString(raw))  # FromString is untyped
            except NoResponders:
                # no router subscribed right now (all restarting, NATS just reconnected): nothing was taken,
                # so trying again is safe, generations included, while the deadline leaves time
                if ctx.remaining_s() < 2 * NO_ROUTER_RETRY_S or time.monotonic() >= give_up:
                    raise
                await asyncio.sleep(NO_ROUTER_RETRY_S)
            except asyncio.CancelledError as exc:
                if exc.args != (_REROUTE,) or task.uncancel() != 0:
                    raise
                if generation:  # its gateways send the generations no worker accepted again themselves
                    raise Abandoned from None
                if sends == MAX_ROUTE_SENDS:
                    raise errors.Unavailable(
                        f"the batch of {model!r} was lost on its way {sends} times", retry_after_s=1, model=model
                    ) from None
                sends += 1
            finally:
                waits.pop(task, None)

    # the routing table ------------------------------------------------------------------------------
    async def _on_table(self, msg: Msg) -> None:
        self._apply_table(msg.data)

    def _apply_table(self, raw: bytes) -> None:
        """A router's RoutingTable: the workers (a worker no longer listed has left: the batches waiting on it
        go to another), suspensions, loads and the batchers sharing the slots."""
        try:
            table = registry_pb2.RoutingTable.FromString(raw)
        except DecodeError:
            return
        known = self.table.instances
        listed = {w.id: w for w in table.workers}
        for worker_id in [w for w in known if w not in listed]:
            self.table.remove(worker_id)
            self.dispatcher.worker_left(worker_id)
        for worker_id, info in listed.items():
            if known.get(worker_id) != info:
                self.table.upsert(info, self.generative)
        for worker_id, left_s in table.suspended_s.items():
            if not self.table.is_suspended(worker_id):
                self.table.suspend(worker_id, left_s)
        for load in table.loads:
            self.table.set_load(load.worker_id, load.model, load.sequences)
        self._batchers = list(table.batchers)
        if not self._table_from:
            self.log.info("routing table from %s: %d worker(s); batches go straight to workers", table.router_id, len(listed))
        self._table_from = table.router_id

    async def _ask_table(self) -> None:
        """Ask the routers for their table before taking requests; without an answer (no router yet) batches go
        to the routers until one publishes its table."""
        try:
            raw = await self.bus.request(subjects.ROUTING_TABLE_GET, b"", RequestContext.new(TABLE_ASK_S), timeout_s=TABLE_ASK_S)
        except errors.UnimodelError as exc:
            self.log.info("no routing table yet (%s): batches go to the routers until one is published", exc.message)
            return
        self._apply_table(raw)

    async def _on_load(self, msg: Msg) -> None:
        self.dispatcher.on_load(msg.data)

    def _suspected(self, worker_id: str) -> None:
        """A worker did not answer a batch (suspended here): tell the routers, for the other batchers."""
        report = registry_pb2.WorkerSuspected(worker_id=worker_id, reporter=self.id, for_s=self.settings.suspend_s)
        self.spawn(self._report(report), "report a suspected worker")

    async def _report(self, report: registry_pb2.WorkerSuspected) -> None:
        try:
            await self.bus.publish(subjects.SUSPECT, report.SerializeToString(), what="a suspected worker")
        except errors.UnimodelError as exc:  # NATS down: the routers learn it from the worker's lease
            self.log.debug("could not report %s: %s", report.worker_id, exc.message)

    def _owned(self, model: str) -> dict[str, int] | None:
        """This batcher's slots of each instance of `model` (core/capacity_shares.py `owned`): the same split
        every batcher computes from the same table, so two batchers never pick the same free slot."""
        if not self._batchers:
            return None
        table = self.table
        rank, batchers = capacity_shares.rank(self._batchers, self.id, model)
        slots = [(iid, table.slots(iid, model)) for iid in table.candidates(model)]
        return capacity_shares.owned(slots, batchers, rank, time.time())

    def _fill_shares(self, model: str, ack: inference_pb2.BatchAck) -> None:
        """The model's slots and this batcher's rank among the batchers (core/capacity_shares.py), as a router
        fills them in its acks."""
        ack.capacity = self.table.capacity(model)
        if self._batchers:
            ack.batcher_rank, ack.batchers = capacity_shares.rank(self._batchers, self.id, model)

    def _bus_reconnected(self) -> None:
        """After a NATS reconnect a batch or its ack may have been lost on the way: once the routers had
        time to subscribe again, the batches waiting since before are sent again (as for a gone router)."""
        self.spawn(self._after_reconnect(time.monotonic()), "after a NATS reconnect")

    async def _after_reconnect(self, reconnected: float) -> None:
        await asyncio.sleep(path_watch.STALL_S)
        waiting = [task for waits in (self._routing, self._direct) for task, sent in waits.items() if sent < reconnected]
        for task in waiting:
            task.cancel(_REROUTE)
        if waiting:
            self.log.warning("NATS reconnected: sending %d waiting batch(es) again", len(waiting))

    async def _watch_routers(self) -> None:
        """While a batch has waited over path_watch.STALL_S for its ack, ask the registered routers whether
        they are still connected (core/path_watch.py); when one is gone, every batch that waited since
        before the check is sent again (we cannot know which router took it: NATS queue group)."""
        watch = path_watch.PathWatch(lambda i: self.bus.alive(i, path_watch.PROBE_TIMEOUT_S), path_watch.STALL_S)
        while True:
            await asyncio.sleep(path_watch.INTERVAL_S)
            checked = time.monotonic()
            gone = await watch.check(min(self._routing.values(), default=None), self.routers.items.values())
            if not gone:
                continue
            waiting = [task for task, sent in self._routing.items() if sent < checked]
            for task in waiting:
                task.cancel(_REROUTE)
            self.log.warning(
                "router %s is gone: sending %d waiting batch(es) again (generations: left to their gateways)",
                ", ".join(gone), len(waiting),
            )

    def _trace_batch(
        self, state: ModelState, batch: list[Pending[Item]], batch_id: str, rows: int, ctx: RequestContext
    ) -> tuple[Span | None, RequestContext]:
        """The batch's dispatch span, in the first request's trace, linked to every request's queue span."""
        span, ctx = tracing.start_in(tracing.Name.BATCHER_DISPATCH, ctx, tracing.PRODUCER, {
            Attr.MODEL: state.model, Attr.BATCH_ID: batch_id, Attr.BATCH_SIZE: len(batch), Attr.BATCH_ROWS: rows,
            Attr.MESSAGING_SYSTEM: "nats", Attr.MESSAGING_DESTINATION: subjects.route(state.model),
        })
        if span is not None:
            for pending in batch:
                queue_span = pending.payload.span
                if queue_span is not None:
                    span.add_link(queue_span.get_span_context())
        return span, ctx

    @staticmethod
    def _end_queue_spans(
        batch: list[Pending[Item]], batch_id: str, rows: int, waits: list[int], dispatch: Span | None, end_ns: int
    ) -> None:
        """End each request's queue span at its dispatch (`end_ns`): its wait and the batch it joined.
        Called once the batch was acknowledged, so the batch does not wait for it."""
        dispatched = dispatch.get_span_context() if dispatch is not None else None
        for pending, waited_ns in zip(batch, waits, strict=True):
            queue_span = pending.payload.span
            if queue_span is None:
                continue
            queue_span.set_attribute(Attr.BATCH_SIZE, len(batch))
            queue_span.set_attribute(Attr.BATCH_ROWS, rows)
            queue_span.set_attribute(Attr.BATCH_ID, batch_id)
            queue_span.set_attribute(Attr.QUEUE_WAIT_MS, waited_ns / 1e6)
            if dispatched is not None:
                queue_span.add_link(dispatched)
            queue_span.end(end_ns)

    def _reject(self, state: ModelState, batch: list[Pending[Item]], err: errors.UnimodelError) -> None:
        """Answer requests that leave the queue without running (one task for all of them)."""
        for pending in batch:
            tracing.finish(pending.payload.span, err)
        reason = _REASONS.get(type(err))
        if reason:
            self.stats.reject(state.label, reason, len(batch))
        task = asyncio.get_running_loop().create_task(self._answer(batch, err))
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)

    async def _answer(self, batch: list[Pending[Item]], err: errors.UnimodelError) -> None:
        for pending in batch:
            await self.bus.publish_error(pending.payload.reply_to, err)

    def _queue_stats(self) -> list[tuple[str, int, int]]:
        # Called from the metrics server's thread: list() copies the values atomically under the GIL.
        return [(s.label, s.scheduler.queue.count, s.scheduler.inflight) for s in list(self.queues.values())]

    async def _sweep_idle(self) -> None:
        """Forget the queues of models that had no traffic for queue_idle_s."""
        idle_s = self.settings.queue_idle_s
        while True:
            await asyncio.sleep(max(0.05, idle_s / 2))
            cutoff = time.time() - idle_s
            for subject, state in list(self.queues.items()):
                if state.scheduler.idle and state.scheduler.last_active < cutoff:
                    del self.queues[subject]
                    state.scheduler.close()
                    if state.turn is not None:
                        state.turn.cancel()

    # lifecycle ----------------------------------------------------------------------------------
    async def on_drain(self, timeout_s: float) -> None:
        # No new requests arrive (unsubscribed): send what is queued and wait for every batch's ack.
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        states = list(self.queues.values())
        await asyncio.gather(*(s.scheduler.drain(max(0.0, end - loop.time())) for s in states))
        for state in states:
            state.scheduler.close()  # what is left is answered UNAVAILABLE
        if self._replies:
            await asyncio.wait(set(self._replies), timeout=max(0.1, end - loop.time()))

    async def on_close(self) -> None:
        await self.models.stop()
        await self.routers.stop()
