"""Batch forming for one model, free of transports (Ray Serve's batch loop, Triton's vocabulary).

Wait for the first request; then keep filling until `max_batch_size` or until `max_queue_delay_s`
has passed since the first arrived. Requests whose deadline passed, or whose caller went away, are
dropped from the batch while they wait (the expired ones get DEADLINE_EXCEEDED): expired work never runs.
The queue is bounded: overflow raises ResourceExhausted, which callers see as 429 / RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import Any

from unimodel.core import errors
from unimodel.core.context import now_ms


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    max_batch_size: int = 32
    max_queue_delay_s: float = 0.0
    max_queue_size: int = 1024


@dataclass(slots=True, eq=False)
class Pending:
    request_id: str
    payload: Any
    deadline_ms: int = 0
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    enqueued: float = field(default_factory=time.monotonic)

    def expired(self, now: int) -> bool:
        return bool(self.deadline_ms) and now >= self.deadline_ms


class ModelQueue:
    def __init__(self, model: str, policy: BatchPolicy) -> None:
        self.model = model
        self.policy = policy
        self._items: collections.deque[Pending] = collections.deque()
        self._arrived = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Pending) -> None:
        if len(self._items) >= self.policy.max_queue_size:
            raise errors.ResourceExhausted(
                f"queue of model {self.model!r} is full ({self.policy.max_queue_size} requests)",
                retry_after_s=max(0.05, self.policy.max_queue_delay_s * 2),
                model=self.model,
            )
        self._items.append(item)
        self._arrived.set()

    def _take(self, batch: list[Pending]) -> None:
        now = now_ms()
        while self._items and len(batch) < self.policy.max_batch_size:
            item = self._items.popleft()
            if item.future.done():  # settled elsewhere (cancelled): nothing to run
                continue
            if item.expired(now):
                item.future.set_exception(errors.DeadlineExceeded("deadline exceeded while queued", model=self.model))
                continue
            batch.append(item)
        if not self._items:
            self._arrived.clear()

    async def next_batch(self, idle_timeout_s: float | None = None) -> list[Pending]:
        """The next batch (never empty), or [] if nothing arrived within `idle_timeout_s`."""
        batch: list[Pending] = []
        while not batch:
            if not self._items and not await self._wait_arrival(idle_timeout_s):
                return []
            self._take(batch)
        if self.policy.max_queue_delay_s > 0:
            window_end = batch[0].enqueued + self.policy.max_queue_delay_s
            while len(batch) < self.policy.max_batch_size:
                left = window_end - time.monotonic()
                if left <= 0:
                    break
                if not self._items and not await self._wait_arrival(left):
                    break
                self._take(batch)
        return batch

    async def _wait_arrival(self, timeout_s: float | None) -> bool:
        """Wait for a request to arrive; False on timeout. asyncio.timeout arms a timer only, where
        wait_for would create a task per wait (this runs once per batch)."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._arrived.wait()
        except TimeoutError:
            return False
        return True
