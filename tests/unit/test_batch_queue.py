from __future__ import annotations

import asyncio
import time

import pytest

from unimodel.batcher.queue import BatchPolicy, ModelQueue, Pending
from unimodel.core import errors
from unimodel.core.context import now_ms


def pending(i: int, deadline_ms: int = 0) -> Pending:
    return Pending(f"r{i}", i, deadline_ms)


async def test_takes_what_is_queued_up_to_max_batch_size() -> None:
    q = ModelQueue("m", BatchPolicy(max_batch_size=3))
    items = [pending(i) for i in range(5)]
    for it in items:
        q.put(it)
    assert [p.payload for p in await q.next_batch()] == [0, 1, 2]
    assert [p.payload for p in await q.next_batch()] == [3, 4]


async def test_waits_up_to_max_queue_delay_for_more() -> None:
    q = ModelQueue("m", BatchPolicy(max_batch_size=4, max_queue_delay_s=0.2))
    q.put(pending(0))

    async def later() -> None:
        await asyncio.sleep(0.05)
        q.put(pending(1))

    task = asyncio.create_task(later())
    start = time.monotonic()
    batch = await q.next_batch()
    elapsed = time.monotonic() - start
    await task
    assert [p.payload for p in batch] == [0, 1]
    assert 0.1 <= elapsed < 1.0  # the window, measured from the first arrival


async def test_full_batch_does_not_wait() -> None:
    q = ModelQueue("m", BatchPolicy(max_batch_size=2, max_queue_delay_s=5))
    q.put(pending(0))
    q.put(pending(1))
    batch = await asyncio.wait_for(q.next_batch(), 1)
    assert len(batch) == 2


async def test_expired_requests_never_leave_the_queue() -> None:
    q = ModelQueue("m", BatchPolicy(max_batch_size=8))
    expired, live = pending(0, now_ms() - 1), pending(1, now_ms() + 60_000)
    q.put(expired)
    q.put(live)
    batch = await q.next_batch()
    assert batch == [live]
    with pytest.raises(errors.DeadlineExceeded):
        expired.future.result()


async def test_cancelled_callers_are_skipped() -> None:
    q = ModelQueue("m", BatchPolicy())
    gone, here = pending(0), pending(1)
    q.put(gone)
    q.put(here)
    gone.future.cancel()
    assert await q.next_batch() == [here]


async def test_overflow_is_resource_exhausted() -> None:
    q = ModelQueue("m", BatchPolicy(max_queue_size=2))
    q.put(pending(0))
    q.put(pending(1))
    with pytest.raises(errors.ResourceExhausted) as info:
        q.put(pending(2))
    assert info.value.retry_after_s > 0


async def test_idle_timeout_returns_empty() -> None:
    q = ModelQueue("m", BatchPolicy())
    assert await q.next_batch(idle_timeout_s=0.01) == []
