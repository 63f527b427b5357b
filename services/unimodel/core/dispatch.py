"""Sending a batch to one worker instance and waiting for its BatchAck, free of any one service.

The choice (core/routing_policy.py: least outstanding work with two random choices, generations by
conversation affinity), the send, the retries on an instance that is lost or does not answer, the busy
answer (every slot of the model was taken: nothing ran), and the watch for acks lost to a NATS reconnect.

The batcher dispatches each batch this way, straight to a worker, from the table the routers publish
(router/service.py: placement, slots, suspensions, generation loads); the router does the same for a batch
a batcher sends it (a batcher that has no table yet, or a model the table does not list yet).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry, Counter, Histogram

from unimodel.core import errors, path_watch
from unimodel.core.bus import Bus, NoResponders
from unimodel.core.context import RequestContext
from unimodel.core.routing_policy import WorkerTable
from unimodel.v1 import inference_pb2, registry_pb2

OK, RETRIED, NOT_SERVED, NO_WORKER, BUSY = "ok", "retried", "not_served", "unavailable", "busy"
"""Outcomes of dispatching a batch: answered by the first worker, by another after a retry, no worker serves
the model (NOT_FOUND), or none could run it (UNAVAILABLE), or every instance's slots were taken (busy)."""
OTHER_MODEL = "other"
"""Metrics label of a model no known instance serves (client input cannot grow the label set)."""

_LOST = "unimodel: worker lost"
"""Cancel message for a send whose worker left; swallowed (uncancel) and turned into WorkerLost."""
_ACK_LOST = "unimodel: worker reconnected"
"""Cancel message for a send whose worker reconnected to NATS after the batch was sent (its node of a NATS
cluster died): the ack may be lost on the way; turned into AckLost, the batch is sent again."""

MAX_ACK_LOST_SENDS = 3
"""A batch whose ack was lost to a reconnect is sent again at most this many times."""
NO_WORKER_RETRY_S = 0.25
NO_WORKER_WAIT_S = 3.0
"""When every instance of the model answered "no responders" (none subscribed at this moment: their NATS node
died and they are moving to another, all at once), the batch is tried again every NO_WORKER_RETRY_S for up to
NO_WORKER_WAIT_S while its deadline allows, as a batcher does for routers and a gateway for batchers."""


class WorkerLost(Exception):
    """The instance left (lease expired or revoked) while a batch was on it."""


class AckLost(WorkerLost):
    """The worker is alive but reconnected to NATS since the batch was sent: its ack may never come."""


DECISION_BUCKETS = (0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.005)
DISPATCH_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class DispatchMetrics:
    """The series of a service that dispatches batches, under the names its metrics module declares: batches by
    model and outcome, the time to choose an instance, and the time from a batch's arrival to its ack."""

    def __init__(self, registry: CollectorRegistry, *, batches: str, decision: str, duration: str) -> None:
        self.batches = Counter(
            batches,
            "Batches dispatched to a worker, by model and outcome (ok, retried: by another worker after one was lost, "
            "not_served, unavailable, busy: every instance's slots were taken)",
            ["model", "outcome"], registry=registry,
        )
        self.decision = Histogram(
            decision, "Time to choose a worker for a batch (the routing policy alone)", registry=registry,
            buckets=DECISION_BUCKETS,
        )
        self.duration = Histogram(
            duration, "From a batch's arrival to its worker's acknowledgement", ["model"], registry=registry,
            buckets=DISPATCH_BUCKETS,
        )

    def decided(self, seconds: float) -> None:
        self.decision.observe(seconds)

    def batch(self, model: str, outcome: str, seconds: float) -> None:
        self.batches.labels(model, outcome).inc()
        self.duration.labels(model).observe(seconds)


class DispatchStats(Protocol):
    def decided(self, seconds: float) -> None:
        """Time the routing policy took to choose an instance."""

    def batch(self, model: str, outcome: str, seconds: float) -> None:
        """A batch dispatched: its model label, outcome and time from arrival to ack."""


@dataclass(frozen=True, slots=True)
class DispatchSettings:
    retries: int  # times a batch is sent to another instance when one is lost
    try_timeout_s: float  # max wait for one worker's ack
    suspend_s: float  # how long an instance that did not answer gets no traffic (unless no other)


Choose = Callable[[int, list[str]], "str | None"]
"""(attempt, instances tried) -> the instance to send to next, or None."""


class Dispatcher:
    """One service's sends of batches to workers; the owner keeps `table` up to date, calls `worker_left`
    when an instance leaves, `on_load` for the workers' load reports, and runs `watch_acks`."""

    def __init__(
        self, bus: Bus, table: WorkerTable, settings: DispatchSettings, stats: DispatchStats, log: logging.Logger,
        *, known: Callable[[], bool], on_suspend: Callable[[str], None] | None = None,
        owned: Callable[[str], Mapping[str, int] | None] | None = None,
    ) -> None:
        self.bus = bus
        self.table = table
        self.settings = settings
        self.stats = stats
        self.log = log
        self.known = known  # whether the instances are known (else "not discovered yet", not NOT_FOUND)
        self.on_suspend = on_suspend  # an instance was just suspended here
        self.owned = owned  # model -> this sender's slots of each instance (several senders: capacity_shares)
        self.generative: set[str] = set()  # text-generation models (batches split per item)
        self._inflight: dict[str, set[asyncio.Task[object]]] = {}
        self._sent_at: dict[asyncio.Task[object], float] = {}  # sends -> time.monotonic() sent to the worker

    def worker_left(self, worker_id: str) -> None:
        """The instance left: the sends waiting on it end with WorkerLost (sent to another)."""
        for task in self._inflight.pop(worker_id, set()):
            task.cancel(_LOST)

    def holding(self) -> int:
        """Batches waiting on a worker's ack now."""
        return sum(len(tasks) for tasks in self._inflight.values())

    def on_load(self, raw: bytes) -> None:
        """A worker's generation ended: its sequence count for the model, as it is now."""
        try:
            load = registry_pb2.ModelLoad.FromString(raw)
        except DecodeError:
            return
        self.table.set_load(load.worker_id, load.model, load.sequences)

    async def dispatch(
        self, model: str, payload: bytes, ctx: RequestContext, fill: Callable[[inference_pb2.BatchAck], None],
        batch: inference_pb2.BatchRequest | None = None,
    ) -> inference_pb2.BatchAck:
        """Send a batch of `model` (`payload`, the BatchRequest's bytes, sent as they are; `batch`, its decoded
        form, when the caller has it) to a worker and return the ack, which `fill` completes (the model's slots,
        the sender's rank among the batchers)."""
        if model in self.generative:
            return await self._dispatch_generation(batch or inference_pb2.BatchRequest.FromString(payload), ctx, fill)
        table = self.table
        own = self.owned(model) if self.owned is not None else None
        return await self._dispatch(model, payload, ctx, lambda _attempt, tried: table.pick(model, tried, own), fill)

    async def _dispatch(
        self, model: str, payload: bytes, ctx: RequestContext, choose: Choose, fill: Callable[[inference_pb2.BatchAck], None],
        *, track_load: bool = False,
    ) -> inference_pb2.BatchAck:
        """Send the batch to the worker `choose(attempt, tried)` names; a worker that is lost or does not
        answer is suspended and the next choice tried, up to `retries` more times. With `track_load`, the
        worker's reported load is recorded (generations). A worker whose slots of the model were all taken
        (ack.busy: nothing ran) is not suspended: the next choice is tried, and when every one was busy the
        busy ack goes back to the sender, which sends the batch again shortly. When every instance answered
        "no responders" the whole round is tried again for a moment (NO_WORKER_WAIT_S)."""
        label = model if self.table.serves(model) else OTHER_MODEL
        arrived = time.perf_counter()
        give_up = time.monotonic() + NO_WORKER_WAIT_S
        while True:
            outcome, result, again = await self._round(model, payload, ctx, choose, fill, arrived, label, track_load)
            if not again or time.monotonic() >= give_up or ctx.remaining_s() < 2 * NO_WORKER_RETRY_S:
                break
            await asyncio.sleep(NO_WORKER_RETRY_S)
        if isinstance(result, inference_pb2.BatchAck):
            return result
        self.stats.batch(label, outcome, time.perf_counter() - arrived)
        raise result

    async def _round(
        self, model: str, payload: bytes, ctx: RequestContext, choose: Choose, fill: Callable[[inference_pb2.BatchAck], None],
        arrived: float, label: str, track_load: bool,
    ) -> tuple[str, inference_pb2.BatchAck | errors.UnimodelError, bool]:
        """One round over the instances: (outcome, the ack or the error, whether to try another round: only when
        every instance tried answered "no responders"). An ack's outcome is counted here, an error's by the
        caller once it gives up."""
        tried: list[str] = []
        busy: inference_pb2.BatchAck | None = None
        lost = resent = 0
        only_no_responders = True
        while lost <= self.settings.retries:
            before = time.perf_counter()
            worker_id = choose(len(tried), tried)
            self.stats.decided(time.perf_counter() - before)
            if worker_id is None or worker_id in tried:
                break
            tried.append(worker_id)
            try:
                raw = await self._send(worker_id, model, payload, ctx)
            except AckLost as exc:  # alive: sent again (to it or another), neither suspended nor a failure
                resent += 1
                if resent <= MAX_ACK_LOST_SENDS:
                    tried.remove(worker_id)
                    self.log.warning("%s; sending the batch again", exc)
                continue
            except (WorkerLost, errors.Unavailable) as exc:
                lost += 1
                only_no_responders = only_no_responders and isinstance(exc, NoResponders)
                if self.table.suspend(worker_id, self.settings.suspend_s):
                    self.log.warning("%s did not answer (%s); suspended for %.1fs", worker_id, exc, self.settings.suspend_s)
                    if self.on_suspend is not None:
                        self.on_suspend(worker_id)
                continue
            ack = inference_pb2.BatchAck.FromString(raw)
            fill(ack)
            if ack.busy:
                busy = ack
                continue
            if track_load:
                self.table.set_load(worker_id, model, ack.load)
            self.stats.batch(label, RETRIED if len(tried) > 1 else OK, time.perf_counter() - arrived)
            return OK, ack, False
        if busy is not None:
            self.stats.batch(label, BUSY, time.perf_counter() - arrived)
            return BUSY, busy, False
        if tried:
            err = errors.Unavailable(
                f"no instance of {model!r} could run the batch (tried {', '.join(tried)})", retry_after_s=1, model=model
            )
            return NO_WORKER, err, only_no_responders
        if self.table.instances or self.known():
            return NOT_SERVED, errors.NotFound(f"model {model!r} is not served by any worker", model=model), False
        return NO_WORKER, errors.Unavailable("router has not discovered workers yet", retry_after_s=1), False

    async def _dispatch_generation(
        self, batch: inference_pb2.BatchRequest, ctx: RequestContext, fill: Callable[[inference_pb2.BatchAck], None]
    ) -> inference_pb2.BatchAck:
        """A generation batch: each item to its conversation's home worker while load allows (policy
        pick_affine), the parts sent side by side, one ack for the sender."""
        model = batch.model
        parts: dict[str, inference_pb2.BatchRequest] = {}
        for index, item in enumerate(batch.items):
            worker_id = self.table.pick_affine(model, item.generate.session)
            if worker_id is None:
                return await self._dispatch_part(batch, ctx, fill)  # no instance known: the plain path's errors
            part = parts.get(worker_id)
            if part is None:
                part = parts[worker_id] = inference_pb2.BatchRequest(batch_id=batch.batch_id, model=model, path=batch.path)
            part.items.append(item)
            if len(batch.queue_ns) == len(batch.items):
                part.queue_ns.append(batch.queue_ns[index])
            self.table.add_load(worker_id, model, 1)  # seen by the next item's choice
        if len(parts) == 1:
            ((worker_id, part),) = parts.items()
            return await self._dispatch_part(part, ctx, fill, first=worker_id)
        acks = await asyncio.gather(*(self._dispatch_part(p, ctx, fill, first=w) for w, p in parts.items()), return_exceptions=True)
        merged = inference_pb2.BatchAck(batch_id=batch.batch_id)
        fill(merged)
        first_error: BaseException | None = None
        for part, ack in zip(parts.values(), acks, strict=True):
            if isinstance(ack, BaseException):
                first_error = first_error or ack
                merged.failed += len(part.items)
                continue
            merged.succeeded += ack.succeeded
            merged.failed += ack.failed
            merged.worker_id = merged.worker_id or ack.worker_id
        if first_error is not None and merged.succeeded == 0 and merged.failed == len(batch.items):
            raise first_error
        return merged

    async def _dispatch_part(
        self, batch: inference_pb2.BatchRequest, ctx: RequestContext, fill: Callable[[inference_pb2.BatchAck], None],
        first: str = "",
    ) -> inference_pb2.BatchAck:
        """Send a (part of a) generation batch to `first`, retrying on another worker if it is lost."""
        model = batch.model
        table = self.table

        def choose(attempt: int, tried: list[str]) -> str | None:
            return first if attempt == 0 and first else table.pick_affine(model, "", exclude=tried)

        return await self._dispatch(model, batch.SerializeToString(), ctx, choose, fill, track_load=True)

    async def _send(self, worker_id: str, model: str, payload: bytes, ctx: RequestContext) -> bytes:
        """Request/reply with one worker, in the caller's own task (no extra task per batch): if the worker
        leaves meanwhile, `worker_left` cancels this task with _LOST, turned into WorkerLost."""
        info = self.table.instances[worker_id]
        task = asyncio.current_task()
        assert task is not None
        inflight = self._inflight.setdefault(worker_id, set())
        inflight.add(task)
        if model not in self.generative:  # a generation is never sent twice: its ack is not watched
            self._sent_at[task] = time.monotonic()
        self.table.begin(worker_id)
        try:
            return await self.bus.request(info.nats_subject, payload, ctx, timeout_s=self.settings.try_timeout_s)
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

    async def watch_acks(self) -> None:
        """While a batch has waited over path_watch.STALL_S for a worker's ack, ask the workers holding
        batches whether they reconnected to NATS since (core/path_watch.py): one whose node of a NATS
        cluster died may have lost the ack on the way, so the batches sent to it before are sent again
        (AckLost: to it or another, not a suspension), instead of waiting try_timeout_s with the sender's
        slot held. A worker that does not answer at all is left to its lease (`worker_left`): while it moves
        to another node it does not answer either. Generation batches are left alone (acked as soon as they
        start; a generation must not run twice)."""
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
