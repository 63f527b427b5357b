"""Drives one model's ModelQueue on the event loop: when to form a batch, how many run at once.

A request that finds no batch of its model in flight here is sent at once (with what arrived in the same loop
iteration), unless the policy holds when idle: the batching window only applies while batches are in flight,
when the requests that wait for it fill the next batch instead of keeping a free worker waiting.

Ray Serve's batch loop habits without a loop task per model: arrivals and timers call `_pump`, which
answers expired requests, forms batches while fewer than `max_inflight` are dispatched, and arms ONE
timer for the queue: the earlier of the oldest request's window end and the earliest deadline. So a
request that expires while queued is answered when it expires, not when its batch forms, and there is
no timer or task per request. A batch that becomes ready on arrival is formed one loop iteration
later (call_soon), after the rest of the burst that arrived with it has been queued.

Transport-free: `dispatch(batch)` sends a batch (and answers its requests itself if that fails),
`reject(requests, error)` answers requests that leave without running.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Generic

from unimodel.batcher.queue import BatchPolicy, ModelQueue, P, Pending
from unimodel.core import errors

log = logging.getLogger("unimodel.batcher")

Dispatch = Callable[[list[Pending[P]]], Awaitable[None]]
Reject = Callable[[list[Pending[P]], errors.UnimodelError], None]


class Scheduler(Generic[P]):
    def __init__(
        self,
        queue: ModelQueue[P],
        dispatch: Dispatch[P],
        reject: Reject[P],
        max_inflight: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.queue = queue
        self.dispatch = dispatch
        self.reject = reject
        self.max_inflight = max_inflight
        self.clock = clock
        self.inflight = 0
        self.last_active = clock()
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._soon = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def model(self) -> str:
        return self.queue.model

    @property
    def idle(self) -> bool:
        return not self.queue.count and not self.inflight

    def submit(self, item: Pending[P]) -> None:
        """Queue a request (raises the queue's errors: the caller answers them). Never waits."""
        if self._closed:
            raise errors.Unavailable("batcher is shutting down", retry_after_s=1)
        now = self.clock()
        queue = self.queue
        queue.put(item, now)
        self.last_active = now
        if self._soon:
            return
        if self.inflight < self.max_inflight and queue.ready(now, not self.inflight):
            self._soon = True
            self._loop.call_soon(self._pump)
        elif self._timer is None or (item.expires and item.expires < self._timer_at):
            self._arm(now)

    def set_max_inflight(self, n: int) -> None:
        """Batches dispatched at once from now on (0: none until raised); a raise sends what may go now."""
        n = max(0, n)
        raised = n > self.max_inflight
        self.max_inflight = n
        if raised and not self._soon and self.queue.count:
            self._soon = True
            self._loop.call_soon(self._pump)

    def set_policy(self, policy: BatchPolicy) -> None:
        """A new policy applies from the next batch on."""
        dropped = self.queue.set_policy(policy)
        if dropped:
            self.reject(
                dropped,
                errors.InvalidArgument(
                    f"model {self.model!r} now takes at most {policy.max_rows} rows per batch", model=self.model
                ),
            )
        if not self._soon:
            self._pump()

    # the loop -----------------------------------------------------------------------------------
    def _pump(self, timer_at: float = 0.0) -> None:
        self._soon = False
        # A timer may fire a little early (the loop's clock granularity): it counts as on time.
        now = max(self.clock(), timer_at)
        if timer_at:
            self._timer, self._timer_at = None, math.inf
        queue = self.queue
        expired = queue.expire(now)
        if expired:
            self.reject(expired, errors.DeadlineExceeded("deadline exceeded while queued", model=self.model))
        while self.inflight < self.max_inflight and queue.ready(now, not self.inflight):
            batch = queue.take(now)
            if not batch:
                break
            self._start(batch)
        self._arm(now)

    def _arm(self, now: float) -> None:
        """One timer for the queue: the earliest deadline, or the window end when a batch may be sent."""
        queue = self.queue
        at = queue.next_expiry()
        if queue.count and self.inflight < self.max_inflight:
            at = min(at, queue.window_end())
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, math.inf
        if at != math.inf:
            self._timer_at = at
            self._timer = self._loop.call_later(max(0.0, at - now), self._pump, at)

    def _start(self, batch: list[Pending[P]]) -> None:
        self.inflight += 1
        task = self._loop.create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    async def _run(self, batch: list[Pending[P]]) -> None:
        try:
            await self.dispatch(batch)
        except Exception:  # dispatch answers its own failures; this is a bug, not a routing error
            log.exception("dispatch of a %s batch failed", self.model)
            self.reject(batch, errors.Internal("internal error"))

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.inflight -= 1
        self.last_active = self.clock()
        if not self._soon and self.queue.count:
            self._pump()

    # shutdown -----------------------------------------------------------------------------------
    async def drain(self, timeout_s: float) -> bool:
        """Send what is queued and wait for every batch; True when all finished in time."""
        loop = self._loop
        end = loop.time() + timeout_s
        while not self.idle and loop.time() < end:
            if self.queue.count and self.inflight < max(1, self.max_inflight):
                # windows no longer matter: send what is queued now
                now = self.clock()
                expired = self.queue.expire(now)
                if expired:
                    self.reject(expired, errors.DeadlineExceeded("deadline exceeded while queued", model=self.model))
                while self.inflight < max(1, self.max_inflight) and self.queue.count:
                    self._start(self.queue.take(now))
            await asyncio.sleep(0.005)
        return self.idle

    def close(self) -> None:
        """Stop: answer what is still queued as unavailable, cancel the timer and unfinished batches."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, math.inf
        left = self.queue.clear()
        if left:
            self.reject(left, errors.Unavailable("batcher is shutting down", retry_after_s=1))
        for task in list(self._tasks):
            task.cancel()
