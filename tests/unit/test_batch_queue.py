"""The batcher's plain logic: batch forming (ModelQueue, time passed in), its scheduler on a real event
loop with an in-memory dispatch, the wire assembly of BatchRequests, and the metrics module."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from unimodel.batcher import wire
from unimodel.batcher.metrics import BatcherMetrics
from unimodel.batcher.queue import CANCELLED, EXPIRED, QUEUED, TAKEN, BatchPolicy, ModelQueue, Pending
from unimodel.batcher.scheduler import Scheduler
from unimodel.core import errors
from unimodel.v1 import inference_pb2, model_pb2

T0 = 1_700_000_000.0  # a fixed "now" (Unix seconds): queue logic takes time as an argument


def item(i: int, *, rows: int = 1, priority: int = 0, expires: float = 0.0) -> Pending:
    return Pending(f"r{i}", i, rows=rows, priority=priority, expires=expires)


def ids(batch: list[Pending]) -> list[object]:
    return [p.payload for p in batch]


def fill(q: ModelQueue, n: int, now: float = T0, **kw: int) -> list[Pending]:
    items = [item(i, **kw) for i in range(n)]
    for it in items:
        q.put(it, now)
    return items


# --- window and size ------------------------------------------------------------------------------
def test_without_a_window_any_request_is_ready_and_takes_up_to_max_rows() -> None:
    q = ModelQueue("m", BatchPolicy(max_rows=3))
    assert not q.ready(T0) and q.take(T0) == []
    fill(q, 5)
    assert q.ready(T0)
    assert ids(q.take(T0)) == [0, 1, 2]
    assert ids(q.take(T0)) == [3, 4]
    assert len(q) == 0 and q.rows == 0


def test_window_is_measured_from_the_oldest_request() -> None:
    q = ModelQueue("m", BatchPolicy(max_rows=8, max_queue_delay_s=0.010))
    q.put(item(0), T0)
    q.put(item(1), T0 + 0.006)
    assert q.window_end() == pytest.approx(T0 + 0.010)
    assert not q.ready(T0 + 0.009)
    assert q.ready(T0 + 0.010)
    assert ids(q.take(T0 + 0.010)) == [0, 1]
    q.put(item(2), T0 + 0.011)
    assert not q.ready(T0 + 0.015) and q.ready(T0 + 0.021)


def test_full_batch_is_ready_before_the_window_closes() -> None:
    q = ModelQueue("m", BatchPolicy(max_rows=4, max_queue_delay_s=5))
    fill(q, 3)
    assert not q.ready(T0)
    q.put(item(3), T0)
    assert q.ready(T0)
    assert ids(q.take(T0)) == [0, 1, 2, 3]


def test_max_batch_size_counts_rows_and_never_splits_or_overtakes_a_request() -> None:
    q = ModelQueue("m", BatchPolicy(max_rows=8, max_queue_delay_s=5))
    q.put(item(0, rows=3), T0)
    q.put(item(1, rows=3), T0)
    assert q.rows == 6 and not q.ready(T0)
    q.put(item(2, rows=3), T0)
    q.put(item(3, rows=1), T0)  # would fit after 0 and 1, but must not overtake 2
    assert q.ready(T0)  # 10 rows queued >= 8
    assert ids(q.take(T0)) == [0, 1]
    assert q.rows == 4 and ids(q.take(T0 + 5)) == [2, 3]


def test_a_request_with_more_rows_than_max_batch_size_is_invalid() -> None:
    q = ModelQueue("m", BatchPolicy(max_rows=8))
    q.put(item(0, rows=8), T0)
    with pytest.raises(errors.InvalidArgument, match="9 rows exceeds max_batch_size 8"):
        q.put(item(1, rows=9), T0)
    assert len(q) == 1


def test_rows_zero_counts_as_one() -> None:
    q = ModelQueue("m", BatchPolicy(max_rows=2))
    q.put(item(0, rows=0), T0)
    assert q.rows == 1


# --- preferred batch sizes ------------------------------------------------------------------------
def test_preferred_sizes_send_the_largest_reached_at_once_and_the_rest_when_the_window_closes() -> None:
    q = ModelQueue("m", BatchPolicy(max_rows=16, max_queue_delay_s=1.0, preferred_batch_sizes=(4, 8)))
    fill(q, 3)
    assert not q.ready(T0)
    q.put(item(3), T0)
    assert q.ready(T0)
    assert ids(q.take(T0)) == [0, 1, 2, 3]
    for i in range(10, 21):  # 11 queued: 8 is the largest preferred size reached
        q.put(item(i), T0 + 0.1)
    assert ids(q.take(T0 + 0.1)) == list(range(10, 18))
    assert len(q) == 3 and not q.ready(T0 + 0.1)


def test_preferred_sizes_leftover_waits_for_the_window() -> None:
    q = ModelQueue("m", BatchPolicy(max_rows=16, max_queue_delay_s=1.0, preferred_batch_sizes=(4, 8)))
    fill(q, 11)
    assert ids(q.take(T0)) == list(range(8))
    assert len(q) == 3 and not q.ready(T0 + 0.5)  # 3 < smallest preferred size: wait
    assert q.ready(T0 + 1.0)
    assert ids(q.take(T0 + 1.0)) == [8, 9, 10]  # the window closed: send what is there


def test_preferred_size_target_never_leaves_a_large_request_behind() -> None:
    q = ModelQueue("m", BatchPolicy(max_rows=16, max_queue_delay_s=1.0, preferred_batch_sizes=(4,)))
    q.put(item(0, rows=6), T0)
    assert q.ready(T0)
    assert ids(q.take(T0)) == [0]  # larger than the target, still sent alone


def test_after_the_window_preferred_sizes_no_longer_cap_the_batch() -> None:
    q = ModelQueue("m", BatchPolicy(max_rows=16, max_queue_delay_s=1.0, preferred_batch_sizes=(4,)))
    fill(q, 6)
    assert len(q.take(T0 + 1.0)) == 6


# --- priorities -----------------------------------------------------------------------------------
def test_higher_priority_batches_first_and_zero_means_the_default_level() -> None:
    q = ModelQueue("m", BatchPolicy(max_rows=3, priority_levels=3, default_priority_level=2))
    q.put(item(0, priority=3), T0)
    q.put(item(1, priority=0), T0)  # default: level 2
    q.put(item(2, priority=3), T0)
    q.put(item(3, priority=1), T0)
    q.put(item(4, priority=9), T0)  # out of range: default level
    assert ids(q.take(T0)) == [3, 1, 4]
    assert ids(q.take(T0)) == [0, 2]


def test_a_lower_priority_request_does_not_overtake_one_that_does_not_fit() -> None:
    q = ModelQueue("m", BatchPolicy(max_rows=4, priority_levels=2))
    q.put(item(0, rows=3, priority=1), T0)
    q.put(item(1, rows=3, priority=1), T0)
    q.put(item(2, rows=1, priority=2), T0)
    assert ids(q.take(T0)) == [0]
    assert ids(q.take(T0)) == [1, 2]


def test_window_follows_the_oldest_request_of_any_level() -> None:
    q = ModelQueue("m", BatchPolicy(max_rows=8, max_queue_delay_s=1.0, priority_levels=2))
    q.put(item(0, priority=2), T0)
    q.put(item(1, priority=1), T0 + 0.5)
    assert q.window_end() == pytest.approx(T0 + 1.0)
    assert ids(q.take(T0 + 1.0)) == [1, 0]


# --- queue full, expiry, cancellation -------------------------------------------------------------
def test_overflow_is_resource_exhausted_with_a_retry_after() -> None:
    q = ModelQueue("m", BatchPolicy(max_queue_size=2))
    fill(q, 2)
    with pytest.raises(errors.ResourceExhausted, match="full") as info:
        q.put(item(2), T0)
    assert info.value.retry_after_s > 0
    assert info.value.metadata == {"model": "m"}
    assert len(q) == 2


def test_retry_after_is_the_time_to_drain_the_queue_at_the_recent_rate() -> None:
    q = ModelQueue("m", BatchPolicy(max_rows=10, max_queue_size=50))
    for step in range(21):  # 10 requests every 0.1 s for 2 s: 100 per second
        now = T0 + step * 0.1
        fill(q, 10, now)
        q.take(now)
    now = T0 + 2.05
    assert q.drain_rate(now) == pytest.approx(100, rel=0.1)
    fill(q, 50, now)
    with pytest.raises(errors.ResourceExhausted) as info:
        q.put(item(99), now)
    assert info.value.retry_after_s == pytest.approx(0.5, rel=0.1)  # 50 queued / 100 per second


def test_retry_after_grows_when_nothing_drains() -> None:
    q = ModelQueue("m", BatchPolicy(max_rows=10, max_queue_size=20))
    for step in range(11):
        fill(q, 10, T0 + step * 0.1)
        q.take(T0 + step * 0.1)
    fill(q, 20, T0 + 1.0)
    fast = q.retry_after(T0 + 1.0)
    stalled = q.retry_after(T0 + 30)
    assert fast < stalled <= 10.0


def test_expired_requests_leave_the_queue_at_their_deadline() -> None:
    q = ModelQueue("m", BatchPolicy(max_rows=8, max_queue_delay_s=10))
    a = item(0, expires=T0 + 0.2)
    b = item(1, expires=T0 + 0.1)
    c = item(2)
    for it in (a, b, c):
        q.put(it, T0)
    assert q.next_expiry() == pytest.approx(T0 + 0.1)
    assert q.expire(T0 + 0.05) == []
    assert q.expire(T0 + 0.1) == [b] and b.state == EXPIRED
    assert q.next_expiry() == pytest.approx(T0 + 0.2)
    assert q.expire(T0 + 0.3) == [a]
    assert len(q) == 1 and q.next_expiry() == math.inf
    assert q.take(T0 + 10) == [c]


def test_an_already_expired_request_is_refused() -> None:
    q = ModelQueue("m", BatchPolicy())
    with pytest.raises(errors.DeadlineExceeded):
        q.put(item(0, expires=T0 - 0.001), T0)
    assert len(q) == 0


def test_taken_requests_no_longer_expire_from_the_queue() -> None:
    q = ModelQueue("m", BatchPolicy())
    a = item(0, expires=T0 + 1)
    q.put(a, T0)
    assert q.take(T0) == [a] and a.state == TAKEN
    assert q.expire(T0 + 2) == [] and a.state == TAKEN


def test_cancelled_callers_are_skipped() -> None:
    q = ModelQueue("m", BatchPolicy())
    gone, here = item(0), item(1)
    q.put(gone, T0)
    q.put(here, T0)
    assert q.cancel(gone) and gone.state == CANCELLED
    assert not q.cancel(gone)
    assert len(q) == 1
    assert q.take(T0) == [here]


def test_lazy_deletion_does_not_grow_without_bound() -> None:
    q = ModelQueue("m", BatchPolicy(max_rows=4, max_queue_delay_s=100, max_queue_size=10))
    for round_ in range(1000):  # requests that expire while the queue is blocked
        now = T0 + round_
        fill(q, 5, now, expires=now + 0.5)  # type: ignore[arg-type]  # expires is a float deadline; fill's **kw says int for the other fields
        assert len(q.expire(now + 0.5)) == 5
    assert len(q) == 0
    assert sum(len(dq) for dq in q._levels) < 200 and len(q._expiry) < 200


# --- models that do not batch; policies from ModelConfig ------------------------------------------
def config(**kw: object) -> model_pb2.ModelConfig:
    batching = kw.pop("batching", {})
    return model_pb2.ModelConfig(name="m", batching=model_pb2.BatchingConfig(**batching), **kw)  # type: ignore[arg-type]  # kw: ModelConfig fields by keyword, typed object here


def test_a_model_that_does_not_batch_gets_one_request_per_batch() -> None:
    policy = BatchPolicy.from_config(
        config(max_batch_size=0, batching={"max_queue_delay_ms": 50, "preferred_batch_sizes": [4]}), BatchPolicy()
    )
    assert (policy.max_rows, policy.batching, policy.max_queue_delay_s, policy.preferred_batch_sizes) == (1, False, 0, ())
    q = ModelQueue("m", policy)
    q.put(item(0, rows=5), T0)  # a non-batching model's request is one unit, whatever its rows
    q.put(item(1), T0)
    assert q.ready(T0)
    assert ids(q.take(T0)) == [0]
    assert ids(q.take(T0)) == [1]


def test_policy_from_config_and_defaults() -> None:
    defaults = BatchPolicy(max_rows=32, max_queue_size=777)
    p = BatchPolicy.from_config(
        config(
            max_batch_size=64,
            batching={
                "max_queue_delay_ms": 2.5,
                "preferred_batch_sizes": [32, 8, 8],
                "priority_levels": 3,
                "default_timeout_ms": 1500,
            },
        ),
        defaults,
    )
    assert p.max_rows == 64 and p.batching
    assert p.max_queue_delay_s == pytest.approx(0.0025)
    assert p.preferred_batch_sizes == (8, 32)
    assert p.max_queue_size == 777  # 0 in the config: the batcher's default
    assert (p.priority_levels, p.default_priority_level) == (3, 3)  # default level 0: the lowest
    assert p.default_timeout_s == 1.5
    assert not p.hold_when_idle  # by default an idle model's request goes at once
    p2 = BatchPolicy.from_config(config(max_batch_size=4, batching={"max_queue_size": 9, "priority_levels": 2,
                                                                    "default_priority_level": 1, "hold_when_idle": True}), defaults)
    assert (p2.max_queue_size, p2.priority_levels, p2.default_priority_level) == (9, 2, 1)
    assert p2.hold_when_idle


def test_a_new_policy_applies_to_the_next_batch() -> None:
    q = ModelQueue("m", BatchPolicy(max_rows=8, priority_levels=1))
    big = item(0, rows=6, priority=2)
    small = [item(i, priority=p) for i, p in ((1, 2), (2, 1), (3, 0))]
    q.put(big, T0)
    for it in small:
        q.put(it, T0)
    dropped = q.set_policy(BatchPolicy(max_rows=2, priority_levels=2, default_priority_level=2))
    assert dropped == [big]  # can no longer run under max_batch_size 2
    assert len(q) == 3 and q.rows == 3
    assert ids(q.take(T0)) == [2, 1]  # priority 1 first now
    assert ids(q.take(T0)) == [3]


def test_queue_clear_returns_what_was_queued() -> None:
    q = ModelQueue("m", BatchPolicy())
    items = fill(q, 3)
    q.take(T0)
    q.put(item(9), T0)
    assert [p.payload for p in q.clear()] == [9] and len(q) == 0
    assert all(it.state != QUEUED for it in items)


# --- the scheduler on a real event loop ----------------------------------------------------------
class Recorder:
    """In-memory peer for the scheduler: records batches and rejections; `gate` holds dispatches."""

    def __init__(self) -> None:
        self.batches: list[list[object]] = []
        self.rejected: list[tuple[object, type[errors.UnimodelError], float]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = time.time()

    async def dispatch(self, batch: list[Pending]) -> None:
        self.batches.append(ids(batch))
        await self.gate.wait()

    def reject(self, batch: list[Pending], err: errors.UnimodelError) -> None:
        for p in batch:
            self.rejected.append((p.payload, type(err), time.time() - self.started))


def scheduler(policy: BatchPolicy, rec: Recorder, max_inflight: int = 4) -> Scheduler:
    return Scheduler(ModelQueue("m", policy), rec.dispatch, rec.reject, max_inflight)


async def settle(s: Scheduler, timeout: float = 2.0) -> None:
    end = time.monotonic() + timeout
    while not s.idle and time.monotonic() < end:
        await asyncio.sleep(0.001)


async def test_a_burst_that_arrives_together_becomes_one_batch() -> None:
    rec = Recorder()
    s = scheduler(BatchPolicy(max_rows=32), rec)
    for i in range(10):
        s.submit(item(i))
    await settle(s)
    assert rec.batches == [list(range(10))]


async def test_window_timer_sends_after_max_queue_delay() -> None:
    rec = Recorder()
    s = scheduler(BatchPolicy(max_rows=32, max_queue_delay_s=0.05, hold_when_idle=True), rec)
    s.submit(item(0))
    await asyncio.sleep(0.02)
    s.submit(item(1))
    assert rec.batches == []
    await asyncio.sleep(0.015)
    assert rec.batches == []
    await settle(s)
    assert rec.batches == [[0, 1]]
    assert time.time() - rec.started == pytest.approx(0.05, abs=0.03)


async def test_a_request_that_finds_the_model_idle_goes_at_once_and_the_window_applies_while_busy() -> None:
    rec = Recorder()
    rec.gate.clear()
    s = scheduler(BatchPolicy(max_rows=32, max_queue_delay_s=0.5), rec)
    s.submit(item(0))
    s.submit(item(1))  # the same loop iteration: the same batch
    await asyncio.sleep(0.01)
    assert rec.batches == [[0, 1]]  # no batch was in flight: sent at once, no 0.5 s window
    s.submit(item(2))
    await asyncio.sleep(0.01)
    s.submit(item(3))
    await asyncio.sleep(0.05)
    assert rec.batches == [[0, 1]]  # a batch in flight: the next one fills during the window
    freed = time.monotonic()
    rec.gate.set()  # the batch in flight ends: the model is idle again, what waits goes now
    await settle(s)
    assert rec.batches == [[0, 1], [2, 3]]
    assert time.monotonic() - freed < 0.25  # not at the window's end (0.5 s after request 2)


async def test_hold_when_idle_waits_the_window_as_triton_does() -> None:
    rec = Recorder()
    s = scheduler(BatchPolicy(max_rows=32, max_queue_delay_s=0.05, hold_when_idle=True), rec)
    s.submit(item(0))
    await asyncio.sleep(0.01)
    assert rec.batches == []
    await settle(s)
    assert rec.batches == [[0]]


async def test_max_inflight_batches_caps_dispatch_and_queued_work_follows() -> None:
    rec = Recorder()
    rec.gate.clear()
    s = scheduler(BatchPolicy(max_rows=2), rec, max_inflight=2)
    for i in range(3):
        s.submit(item(i))
        await asyncio.sleep(0.005)
    assert rec.batches == [[0], [1]] and s.inflight == 2 and len(s.queue) == 1
    for i in range(3, 6):
        s.submit(item(i))
    await asyncio.sleep(0.01)
    assert len(rec.batches) == 2  # still capped
    rec.gate.set()
    await settle(s)
    assert rec.batches == [[0], [1], [2, 3], [4, 5]]


async def test_raising_max_inflight_sends_queued_work_at_once() -> None:
    rec = Recorder()
    rec.gate.clear()
    s = scheduler(BatchPolicy(max_rows=1), rec, max_inflight=1)
    for i in range(3):
        s.submit(item(i))
    await asyncio.sleep(0.01)
    assert rec.batches == [[0]] and len(s.queue) == 2
    s.set_max_inflight(3)  # the router's ack says the model's instances run 3 batches at once
    await asyncio.sleep(0.01)
    assert rec.batches == [[0], [1], [2]] and s.inflight == 3
    s.set_max_inflight(0)  # not this batcher's turn (core/capacity_shares.py): nothing new goes
    assert s.max_inflight == 0
    rec.gate.set()
    await asyncio.sleep(0.01)
    assert s.inflight == 0
    s.submit(item(3))
    await asyncio.sleep(0.01)
    assert rec.batches == [[0], [1], [2]] and len(s.queue) == 1  # held until the limit rises
    s.set_max_inflight(1)
    await settle(s)
    assert rec.batches == [[0], [1], [2], [3]]


async def test_a_request_that_expires_while_queued_is_answered_when_it_expires() -> None:
    rec = Recorder()
    rec.gate.clear()  # the one batch slot stays busy: the second request can only wait
    s = scheduler(BatchPolicy(max_rows=1), rec, max_inflight=1)
    s.submit(item(0))
    await asyncio.sleep(0.005)
    s.submit(item(1, expires=time.time() + 0.1))
    s.submit(item(2, expires=time.time() + 10))
    await asyncio.sleep(0.2)
    assert rec.rejected and rec.rejected[0][:2] == (1, errors.DeadlineExceeded)
    assert rec.rejected[0][2] == pytest.approx(0.105, abs=0.04)  # at its deadline, not when a batch formed
    rec.gate.set()
    await settle(s)
    assert rec.batches == [[0], [2]]  # expired work never ran


async def test_expiry_inside_an_open_window_is_answered_before_the_window_closes() -> None:
    rec = Recorder()
    s = scheduler(BatchPolicy(max_rows=8, max_queue_delay_s=0.5, hold_when_idle=True), rec)
    s.submit(item(0))
    s.submit(item(1, expires=time.time() + 0.05))
    await asyncio.sleep(0.1)
    assert [r[:2] for r in rec.rejected] == [(1, errors.DeadlineExceeded)]
    assert rec.batches == []
    await settle(s)
    assert rec.batches == [[0]]


async def test_one_timer_per_queue_not_per_request() -> None:
    rec = Recorder()
    s = scheduler(BatchPolicy(max_rows=1000, max_queue_delay_s=10, max_queue_size=2000), rec)
    loop = asyncio.get_running_loop()
    before = len(loop._scheduled)  # type: ignore[attr-defined]  # BaseEventLoop's private timer heap, counted on purpose
    now = time.time()
    for i in range(1000):
        s.submit(item(i, expires=now + 5 + i / 1000))
    assert len(loop._scheduled) - before <= 1  # type: ignore[attr-defined]  # BaseEventLoop's private timer heap, counted on purpose
    s.close()


async def test_a_config_change_applies_to_the_next_batch() -> None:
    rec = Recorder()
    s = scheduler(BatchPolicy(max_rows=32, max_queue_delay_s=10, hold_when_idle=True), rec)
    for i in range(3):
        s.submit(item(i))
    await asyncio.sleep(0.01)
    assert rec.batches == []
    s.set_policy(BatchPolicy(max_rows=2))
    await settle(s)
    assert rec.batches == [[0, 1], [2]]


async def test_a_dispatch_bug_fails_every_request_of_the_batch() -> None:
    rec = Recorder()

    async def broken(batch: list[Pending]) -> None:
        raise RuntimeError("boom")

    s = Scheduler(ModelQueue("m", BatchPolicy()), broken, rec.reject, 1)
    s.submit(item(0))
    s.submit(item(1))
    await settle(s)
    assert [r[:2] for r in rec.rejected] == [(0, errors.Internal), (1, errors.Internal)]


async def test_drain_flushes_open_windows_and_close_answers_leftovers() -> None:
    rec = Recorder()
    s = scheduler(BatchPolicy(max_rows=8, max_queue_delay_s=60), rec)
    s.submit(item(0))
    assert await s.drain(1.0)
    assert rec.batches == [[0]]
    rec.gate.clear()
    s2 = scheduler(BatchPolicy(max_rows=1), rec, max_inflight=1)
    s2.submit(item(1))
    s2.submit(item(2))
    assert not await s2.drain(0.05)
    s2.close()
    assert [r[:2] for r in rec.rejected] == [(2, errors.Unavailable)]
    with pytest.raises(errors.Unavailable):
        s2.submit(item(3))


# --- wire assembly ------------------------------------------------------------------------------
def test_appended_fields_set_reply_to_and_deadline_without_re_encoding() -> None:
    original = inference_pb2.BatchItem(request_id="r1", rows=3, priority=2, parameters={"a": "b"})
    original.input.string_value = "hi"
    data = original.SerializeToString() + wire.item_fields("_INBOX.x.y", 1_700_000_000_123)
    parsed = inference_pb2.BatchItem.FromString(data)
    expected = inference_pb2.BatchItem()
    expected.CopyFrom(original)
    expected.reply_to, expected.deadline_unix_ms = "_INBOX.x.y", 1_700_000_000_123
    assert parsed == expected
    keep = inference_pb2.BatchItem(deadline_unix_ms=5, reply_to="old").SerializeToString() + wire.item_fields("new")
    assert inference_pb2.BatchItem.FromString(keep) == inference_pb2.BatchItem(deadline_unix_ms=5, reply_to="new")


def test_request_id_and_trace_context_can_be_filled_in() -> None:
    trace = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "k=v"}
    data = inference_pb2.BatchItem(rows=2).SerializeToString() + wire.item_fields("_INBOX.1", 0, "req-1", trace)
    assert inference_pb2.BatchItem.FromString(data) == inference_pb2.BatchItem(
        rows=2, reply_to="_INBOX.1", request_id="req-1", trace_context=trace
    )
    assert wire.item_fields() == wire.item_fields(deadline_unix_ms=-1) == b""


def test_batch_request_bytes_parse_as_the_generated_message() -> None:
    items = [inference_pb2.BatchItem(request_id=f"r{i}", rows=i, reply_to=f"_INBOX.{i}") for i in range(3)]
    big = inference_pb2.BatchItem(request_id="big")
    big.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 50000], contents=b"\x00" * 200_000)
    items.append(big)
    raw = wire.batch_request("b1", "org/model.v2", ["batcher-1"], [i.SerializeToString() for i in items])
    expected = inference_pb2.BatchRequest(batch_id="b1", model="org/model.v2", items=items, path=["batcher-1"])
    assert inference_pb2.BatchRequest.FromString(raw) == expected
    queue_ns = [0, 127, 300_000, 2**40]
    raw = wire.batch_request("b1", "m", [], [i.SerializeToString() for i in items], queue_ns)
    expected = inference_pb2.BatchRequest(batch_id="b1", model="m", items=items, queue_ns=queue_ns)
    assert inference_pb2.BatchRequest.FromString(raw) == expected
    raw = wire.batch_request("b1", "m", [], [], [-5])  # a clock step back: no negative wait
    assert inference_pb2.BatchRequest.FromString(raw).queue_ns == [0]


# --- metrics ------------------------------------------------------------------------------------
def test_metrics_declare_the_batcher_series_and_read_queue_depth_at_scrape() -> None:
    registry = CollectorRegistry()
    depth = [("iris", 3, 1), ("other", 2, 0), ("other", 1, 2)]
    m = BatcherMetrics(registry, lambda: depth)
    s = m.series("iris")
    s.batch_rows.observe(8)
    s.fill_ratio.observe(0.5)
    for wait in (0.0001, 0.003, 100.0):
        s.queue_wait.observe(wait)
    s.batches_ok += 1
    m.reject("iris", "queue_full")
    m.reject("other", "expired", 3)
    v = registry.get_sample_value
    iris = {"model": "iris"}
    assert v("unimodel_batcher_batch_rows_sum", iris) == 8
    assert v("unimodel_batcher_batch_rows_bucket", {**iris, "le": "4.0"}) == 0
    assert v("unimodel_batcher_batch_rows_bucket", {**iris, "le": "8.0"}) == 1
    assert v("unimodel_batcher_batch_fill_ratio_count", iris) == 1
    assert v("unimodel_batcher_queue_wait_seconds_count", iris) == 3
    assert v("unimodel_batcher_queue_wait_seconds_sum", iris) == pytest.approx(100.0031)
    assert v("unimodel_batcher_queue_wait_seconds_bucket", {**iris, "le": "0.0001"}) == 1  # le: value <= bound
    assert v("unimodel_batcher_queue_wait_seconds_bucket", {**iris, "le": "0.005"}) == 2
    assert v("unimodel_batcher_queue_wait_seconds_bucket", {**iris, "le": "30.0"}) == 2
    assert v("unimodel_batcher_queue_wait_seconds_bucket", {**iris, "le": "+Inf"}) == 3
    assert v("unimodel_batcher_batches_total", {**iris, "result": "ok"}) == 1
    assert v("unimodel_batcher_batches_total", {**iris, "result": "failed"}) == 0
    assert v("unimodel_batcher_rejected_requests_total", {**iris, "reason": "queue_full"}) == 1
    assert v("unimodel_batcher_rejected_requests_total", {"model": "other", "reason": "expired"}) == 3
    assert v("unimodel_batcher_queue_depth", iris) == 3
    assert v("unimodel_batcher_queue_depth", {"model": "other"}) == 3
    assert v("unimodel_batcher_inflight_batches", {"model": "other"}) == 2
    assert m.series("iris") is s
    text = generate_latest(registry).decode()
    assert "# TYPE unimodel_batcher_queue_wait_seconds histogram" in text
    assert "# TYPE unimodel_batcher_batches_total counter" in text


# --- in-flight cap of the batcher service ---------------------------------------------------------
async def test_batcher_keeps_as_many_batches_in_flight_as_the_instances_run() -> None:
    from unimodel.batcher.service import BatcherService
    from unimodel.batcher.settings import BatcherSettings
    from unimodel.core import subjects

    service = BatcherService(BatcherSettings(instance_id="batcher-t", max_inflight_batches=16))
    service.policies["mlp"] = BatchPolicy(max_rows=64)
    service.policies["single"] = BatchPolicy(max_rows=1)
    mlp = service._open(subjects.batch("mlp"))
    single = service._open(subjects.batch("single"))
    assert mlp.scheduler.max_inflight == 1  # until the router's first ack
    assert single.scheduler.max_inflight == 16  # one row per batch: nothing to fill, overlap the hops
    from unimodel.v1 import inference_pb2

    def ack(capacity: int, batchers: int = 0, rank: int = 0) -> inference_pb2.BatchAck:
        return inference_pb2.BatchAck(capacity=capacity, batchers=batchers, batcher_rank=rank)

    service._learn_shares(mlp, ack(3))  # a router that names no batchers: the whole capacity
    assert mlp.scheduler.max_inflight == 3
    service._learn_shares(mlp, ack(40))
    assert mlp.scheduler.max_inflight == 16  # bounded by max_inflight_batches
    service._learn_shares(mlp, ack(7, batchers=3, rank=0))  # 7 slots over 3 batchers: 3, 2, 2
    assert mlp.scheduler.max_inflight == 3 and mlp.turn is None
    service._learn_shares(mlp, ack(7, batchers=3, rank=2))
    assert mlp.scheduler.max_inflight == 2
    service._learn_shares(mlp, ack(0))  # no instance known right now: the last shares stay
    assert mlp.scheduler.max_inflight == 2
    service.queues[mlp.subject] = mlp
    service._learn_shares(mlp, ack(1, batchers=3, rank=1))  # fewer slots than batchers: turns
    assert mlp.scheduler.max_inflight in (0, 1) and mlp.turn is not None
    seen = set()
    for _ in range(8):  # a turn is 50 ms: within 3 turns this batcher has had the slot and lost it
        seen.add(mlp.scheduler.max_inflight)
        await asyncio.sleep(0.05)
    assert seen == {0, 1}
    for state in (mlp, single):
        state.scheduler.close()
        if state.turn is not None:
            state.turn.cancel()
