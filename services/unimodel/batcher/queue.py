"""Batch forming for one model, free of transports and of asyncio (Triton's dynamic-batcher vocabulary).

A :class:`ModelQueue` holds the requests of one model waiting for a batch, one FIFO per priority level
(level 1 = highest). Time is passed in (`now`, Unix seconds), so every rule is testable without a
clock or an event loop; :mod:`unimodel.batcher.scheduler` drives it with timers.

Rules (Triton's dynamic batcher, sizes counted in rows: an item adds `rows` along the batch dimension):
  * a batch is ready when the queued rows reach `max_rows`, or a preferred batch size, or when
    `max_queue_delay_s` has passed since the oldest queued request arrived;
  * a batch takes requests from the highest priority level first, in arrival order, and stops at the
    first request that does not fit: up to `max_rows`, or up to the largest preferred size reached
    while the window is still open. A model that does not batch (max_batch_size 0) gets one request per
    batch;
  * the queue is bounded (`max_queue_size` requests): overflow raises ResourceExhausted with a
    Retry-After estimated from the recent drain rate;
  * one tenant may hold at most `tenant_queue_limit` = max(1, floor(max_queue_share * max_queue_size))
    of the queued requests: over it, that tenant's request is refused (ResourceExhausted naming the
    share) while other tenants still queue, so one tenant flooding a model cannot make it 429 for the
    rest. Requests without a tenant (no API keys, admins in the shared scope) are not counted; a dict
    counter per tenant keeps arrivals O(1);
  * a request whose deadline passes while queued leaves the queue at once (:meth:`ModelQueue.expire`,
    driven by one timer per queue at :meth:`ModelQueue.next_expiry`); expired work is never batched.
    A cancelled request (its caller went away) is skipped.
"""

from __future__ import annotations

import bisect
import collections
import heapq
import itertools
import math
from dataclasses import dataclass
from typing import Generic, TypeVar

from unimodel.core import errors
from unimodel.v1 import model_pb2

QUEUED, TAKEN, EXPIRED, CANCELLED, DROPPED = range(5)
"""States of a Pending request. Only QUEUED ones count; the others may linger in the deques and the
expiry heap until they are popped or compacted away (lazy deletion keeps put/take O(1) / O(log n))."""

P = TypeVar("P")
"""A queued request's payload: whatever the runtime needs to send it (the queue never reads it)."""

MIN_RETRY_AFTER_S = 0.05
MAX_RETRY_AFTER_S = 10.0
FALLBACK_RETRY_AFTER_S = 0.1
"""Retry-After when the queue has not drained anything recently enough to estimate a rate."""

_RATE_WINDOW_S = 1.0


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """How one model's requests are batched (from its ModelConfig, or the batcher's defaults)."""

    max_rows: int = 32
    """Rows a batch may hold (ModelConfig.max_batch_size; 1 for a model that does not batch)."""
    batching: bool = True
    """False: the model does not batch (max_batch_size 0); each request is a batch of its own."""
    max_queue_delay_s: float = 0.0
    hold_when_idle: bool = False
    """True: the window applies even when no batch is in flight (Triton's behaviour); False: a request that
    finds the model idle at this batcher is sent at once (BatchingConfig.hold_when_idle)."""
    preferred_batch_sizes: tuple[int, ...] = ()
    """Ascending, each within 1..max_rows."""
    max_queue_size: int = 1024
    priority_levels: int = 1
    default_priority_level: int = 1
    default_timeout_s: float = 0.0
    """Queue timeout of a request that carries no deadline of its own; 0 = none."""
    max_queue_share: float = 1.0
    """Fraction of max_queue_size one tenant may hold (1 = no per-tenant limit)."""

    def __post_init__(self) -> None:
        if self.max_rows < 1 or self.max_queue_size < 1 or self.priority_levels < 1:
            raise ValueError("max_rows, max_queue_size and priority_levels must be >= 1")
        if not 0 < self.max_queue_share <= 1:
            raise ValueError("max_queue_share must be within (0, 1]")
        if not 1 <= self.default_priority_level <= self.priority_levels:
            raise ValueError("default_priority_level must be within 1..priority_levels")

    @classmethod
    def from_config(cls, config: model_pb2.ModelConfig, defaults: BatchPolicy) -> BatchPolicy:
        """The policy of a registered model; fields the config leaves at 0 take the batcher's defaults
        (max_queue_size) or Triton's (one priority level, no queue timeout)."""
        b = config.batching
        batching = config.max_batch_size > 0
        max_rows = config.max_batch_size if batching else 1
        levels = max(1, b.priority_levels)
        default_level = b.default_priority_level if 0 < b.default_priority_level <= levels else levels
        return cls(
            max_rows=max_rows,
            batching=batching,
            max_queue_delay_s=max(0.0, b.max_queue_delay_ms) / 1000.0 if batching else 0.0,
            hold_when_idle=b.hold_when_idle,
            preferred_batch_sizes=tuple(sorted({s for s in b.preferred_batch_sizes if 0 < s <= max_rows}))
            if batching
            else (),
            max_queue_size=b.max_queue_size if b.max_queue_size > 0 else defaults.max_queue_size,
            priority_levels=levels,
            default_priority_level=default_level,
            default_timeout_s=max(0, b.default_timeout_ms) / 1000.0,
            max_queue_share=defaults.max_queue_share,
        )

    @property
    def tenant_queue_limit(self) -> int:
        """Queued requests one tenant may hold: max(1, floor(max_queue_share * max_queue_size))."""
        return max(1, math.floor(self.max_queue_share * self.max_queue_size))

    def level(self, priority: int) -> int:
        """The level a request's priority maps to: 0 (none) or out of range -> the default level."""
        return priority if 0 < priority <= self.priority_levels else self.default_priority_level


class Pending(Generic[P]):
    """One queued request. `payload` is what the runtime needs to send it (opaque here)."""

    __slots__ = ("request_id", "payload", "rows", "priority", "expires", "enqueued", "level", "state", "tenant")

    def __init__(
        self, request_id: str, payload: P, *, rows: int = 1, priority: int = 0, expires: float = 0.0, tenant: str = ""
    ) -> None:
        self.request_id = request_id
        self.tenant = tenant  # "" = not counted against a tenant's share
        self.payload = payload
        self.rows = rows if rows > 0 else 1
        self.priority = priority
        self.expires = expires  # absolute Unix seconds; 0 = never
        self.enqueued = 0.0
        self.level = 0
        self.state = QUEUED

    def __repr__(self) -> str:
        return f"Pending({self.request_id!r}, rows={self.rows}, level={self.level}, state={self.state})"


class ModelQueue(Generic[P]):
    def __init__(self, model: str, policy: BatchPolicy) -> None:
        self.model = model
        self.policy = policy
        self._levels: list[collections.deque[Pending[P]]] = [collections.deque() for _ in range(policy.priority_levels)]
        self._expiry: list[tuple[float, int, Pending[P]]] = []  # heap by expiry time; lazy deletion
        self._seq = itertools.count()
        self.count = 0  # queued requests
        self.rows = 0  # queued rows
        self._stale = 0  # non-QUEUED entries still held by the deques
        self.tenants: dict[str, int] = {}  # queued requests per (named) tenant
        # drain rate (requests taken per second) over the current and the previous window
        self._rate_t0: float | None = None
        self._rate_n = 0
        self._prev_n = 0
        self._prev_s = 0.0

    def __len__(self) -> int:
        return self.count

    # arrival ------------------------------------------------------------------------------------
    def put(self, item: Pending[P], now: float) -> None:
        """Queue a request; raises InvalidArgument (too many rows), DeadlineExceeded (already expired)
        or ResourceExhausted (queue full)."""
        policy = self.policy
        if not policy.batching:
            item.rows = 1
        elif item.rows > policy.max_rows:
            raise errors.InvalidArgument(
                f"request of {item.rows} rows exceeds max_batch_size {policy.max_rows} of model {self.model!r}",
                model=self.model,
            )
        if item.expires and item.expires <= now:
            raise errors.DeadlineExceeded("deadline exceeded before the request was queued", model=self.model)
        if self.count >= policy.max_queue_size:
            raise errors.ResourceExhausted(
                f"queue of model {self.model!r} is full ({policy.max_queue_size} requests)",
                retry_after_s=self.retry_after(now),
                model=self.model,
            )
        tenant = item.tenant
        if tenant:
            held = self.tenants.get(tenant, 0)
            if policy.max_queue_share < 1 and held >= policy.tenant_queue_limit:
                raise errors.ResourceExhausted(
                    f"tenant {tenant!r} already has {held} requests queued for model {self.model!r}, its share of "
                    f"the queue (max_queue_share {policy.max_queue_share:g} of {policy.max_queue_size})",
                    retry_after_s=self.retry_after(now, held),
                    model=self.model, limit="max_queue_share",
                )
            self.tenants[tenant] = held + 1
        item.state = QUEUED
        item.enqueued = now
        item.level = level = policy.level(item.priority)
        self._levels[level - 1].append(item)
        if item.expires:
            heapq.heappush(self._expiry, (item.expires, next(self._seq), item))
        self.count += 1
        self.rows += item.rows

    def cancel(self, item: Pending[P]) -> bool:
        """The caller went away: the request will be skipped. False if it already left the queue."""
        return self._drop(item, CANCELLED)

    def _drop(self, item: Pending[P], state: int) -> bool:
        if item.state != QUEUED:
            return False
        item.state = state
        self.count -= 1
        self.rows -= item.rows
        self._stale += 1
        if item.tenant:
            self._left(item.tenant)
        return True

    def _left(self, tenant: str) -> None:
        n = self.tenants[tenant] - 1
        if n:
            self.tenants[tenant] = n
        else:
            del self.tenants[tenant]

    # time-driven --------------------------------------------------------------------------------
    def expire(self, now: float) -> list[Pending[P]]:
        """Take every queued request whose deadline is `now` or earlier out of the queue."""
        heap = self._expiry
        if not heap or heap[0][0] > now:
            return []
        out = []
        while heap and heap[0][0] <= now:
            item = heapq.heappop(heap)[2]
            if self._drop(item, EXPIRED):
                out.append(item)
        self._compact()
        return out

    def next_expiry(self) -> float:
        """When the earliest queued request expires (inf: none has a deadline)."""
        heap = self._expiry
        while heap and heap[0][2].state != QUEUED:
            heapq.heappop(heap)
        return heap[0][0] if heap else math.inf

    def oldest(self) -> float:
        """Arrival time of the oldest queued request (inf: the queue is empty)."""
        if not self.count:
            return math.inf
        first = math.inf
        for dq in self._levels:
            while dq and dq[0].state != QUEUED:
                dq.popleft()
                self._stale -= 1
            if dq and dq[0].enqueued < first:
                first = dq[0].enqueued
        return first

    def window_end(self) -> float:
        """When the oldest queued request's batching window closes (inf: the queue is empty)."""
        return self.oldest() + self.policy.max_queue_delay_s

    def ready(self, now: float, idle: bool = False) -> bool:
        """Whether a batch should be sent now; `idle`: no batch of the model is in flight from this batcher,
        so waiting for the window would only keep a free worker waiting (unless the policy holds when idle)."""
        if not self.count:
            return False
        policy = self.policy
        if self.rows >= policy.max_rows or policy.max_queue_delay_s <= 0 or (idle and not policy.hold_when_idle):
            return True
        if policy.preferred_batch_sizes and self.rows >= policy.preferred_batch_sizes[0]:
            return True
        return now >= self.window_end()

    # batch forming ------------------------------------------------------------------------------
    def take(self, now: float) -> list[Pending[P]]:
        """The next batch (empty if the queue is). Call when :meth:`ready`; expire(now) first so that
        no expired request is in it."""
        if not self.count:
            return []
        policy = self.policy
        limit = policy.max_rows
        preferred = policy.preferred_batch_sizes
        if preferred and self.rows < limit and now < self.window_end():
            # the window is open: send the largest preferred size reached (Triton's preferred_batch_size)
            i = bisect.bisect_right(preferred, self.rows)
            if i:
                limit = preferred[i - 1]
        batch: list[Pending[P]] = []
        rows = 0
        for dq in self._levels:
            while dq:
                item = dq[0]
                if item.state != QUEUED:
                    dq.popleft()
                    self._stale -= 1
                    continue
                if rows + item.rows > limit and batch:
                    break  # stop at the first request that does not fit: never overtake it
                dq.popleft()
                item.state = TAKEN
                batch.append(item)
                rows += item.rows
                if item.tenant:
                    self._left(item.tenant)
                if rows >= limit:
                    break
            else:
                continue
            break
        self.count -= len(batch)
        self.rows -= rows
        self._count_drained(len(batch), now)
        self._compact()
        return batch

    def _compact(self) -> None:
        """Drop entries of requests that left the queue once they outnumber the queued ones."""
        if self._stale > self.count + 64:
            for i, dq in enumerate(self._levels):
                self._levels[i] = collections.deque(it for it in dq if it.state == QUEUED)
            self._stale = 0
        if len(self._expiry) > 2 * self.count + 64:
            self._expiry = [e for e in self._expiry if e[2].state == QUEUED]
            heapq.heapify(self._expiry)

    # policy changes -----------------------------------------------------------------------------
    def set_policy(self, policy: BatchPolicy) -> list[Pending[P]]:
        """Apply a new policy from the next batch on. Returns the queued requests it can no longer run
        (more rows than its max_batch_size); they are out of the queue."""
        self.policy = policy
        dropped: list[Pending[P]] = []
        items = sorted((it for dq in self._levels for it in dq if it.state == QUEUED), key=lambda it: it.enqueued)
        self._levels = [collections.deque() for _ in range(policy.priority_levels)]
        self._stale = 0
        self.count = self.rows = 0
        self.tenants = {}
        for item in items:
            if not policy.batching:
                item.rows = 1
            elif item.rows > policy.max_rows:
                item.state = DROPPED
                dropped.append(item)
                continue
            item.level = policy.level(item.priority)
            self._levels[item.level - 1].append(item)
            self.count += 1
            self.rows += item.rows
            if item.tenant:  # already queued: kept even when a smaller share now puts the tenant over it
                self.tenants[item.tenant] = self.tenants.get(item.tenant, 0) + 1
        return dropped

    # backpressure -------------------------------------------------------------------------------
    def _count_drained(self, n: int, now: float) -> None:
        if self._rate_t0 is None:
            self._rate_t0 = now
        elif now - self._rate_t0 >= _RATE_WINDOW_S:
            span = now - self._rate_t0
            # a window that spanned an idle period says nothing about the rate now
            self._prev_n, self._prev_s = (self._rate_n, span) if span < 2 * _RATE_WINDOW_S else (0, 0.0)
            self._rate_n, self._rate_t0 = 0, now
        self._rate_n += n

    def drain_rate(self, now: float) -> float:
        """Requests taken per second over the last one to two seconds (0: unknown)."""
        if self._rate_t0 is None:
            return 0.0
        span = self._prev_s + (now - self._rate_t0)
        if span < 0.05:
            return 0.0
        return (self._prev_n + self._rate_n) / span

    def retry_after(self, now: float, ahead: int | None = None) -> float:
        """Seconds a rejected caller should wait: the time the queue (or `ahead` requests of it) needs to
        drain at the recent rate."""
        rate = self.drain_rate(now)
        if rate <= 0:
            return FALLBACK_RETRY_AFTER_S
        n = self.count if ahead is None else ahead
        return round(min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, n / rate)), 3)

    # shutdown -----------------------------------------------------------------------------------
    def clear(self) -> list[Pending[P]]:
        """Take every queued request out (shutdown): the caller answers them."""
        out = [it for dq in self._levels for it in dq if it.state == QUEUED]
        for item in out:
            item.state = DROPPED
        for dq in self._levels:
            dq.clear()
        self._expiry.clear()
        self.count = self.rows = self._stale = 0
        self.tenants = {}
        return out
