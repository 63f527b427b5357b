"""statistics.ModelStatistics: Triton's per-model counters from the requests the gateway answered."""

from __future__ import annotations

from unimodel.gateway.statistics import EMPTY, BatchSnapshot, Duration, ModelStatistics


def _stats() -> tuple[ModelStatistics, list[int]]:
    clock = [1000]
    return ModelStatistics(clock_ms=lambda: clock[0]), clock


def test_a_model_with_no_request_is_all_zero() -> None:
    stats, _ = _stats()
    assert stats.snapshot("m") == EMPTY and EMPTY.success == Duration(0, 0) and stats.models() == []


def test_success_and_failure_without_worker_timings() -> None:
    stats, clock = _stats()
    stats.record("m", True, 1500, 4)
    clock[0] = 2000
    stats.record("m", True, 500, 0)  # 0 rows counts as 1
    stats.record("m", False, 700, 8)
    snap = stats.snapshot("m")
    assert snap.success == Duration(2, 2000) and snap.fail == Duration(1, 700)
    assert snap.inference_count == 5 and snap.execution_count == 2  # one execution per request without batch sizes
    # Counted as queued and computed (perf_analyzer looks for a growing queue count), with no time known.
    assert snap.queue == Duration(2, 0) and snap.compute_infer == Duration(2, 0)
    assert snap.compute_input == snap.compute_output == Duration(2, 0)  # perf_analyzer requires equal counts
    assert snap.last_inference_ms == 2000 and snap.batches == ()
    assert stats.models() == ["m"]


def test_worker_timings_give_queue_compute_and_exact_executions() -> None:
    stats, _ = _stats()
    # One batch of 8 rows (compute 1000 ns) made of requests of 2, 2 and 4 rows; one lone request of 3 rows.
    for rows in (2, 2, 4):
        stats.record("m", True, 5000, rows, queue_ns=100, compute_ns=1000, batch_rows=8)
    stats.record("m", True, 4000, 3, queue_ns=50, compute_ns=600, batch_rows=3)
    snap = stats.snapshot("m")
    assert snap.inference_count == 11 and snap.execution_count == 2
    assert snap.queue == Duration(4, 350)
    assert snap.compute_infer == Duration(4, 3600)  # each request counts its batch's compute, as Triton does
    assert snap.compute_input == snap.compute_output == Duration(4, 0)
    assert snap.batches == (
        BatchSnapshot(3, Duration(1, 0), Duration(1, 600), Duration(1, 0)),
        BatchSnapshot(8, Duration(1, 0), Duration(1, 1000), Duration(1, 0)),
    )


def test_snapshots_are_copies_and_models_are_separate() -> None:
    stats, _ = _stats()
    stats.record("a", True, 10, 1)
    before = stats.snapshot("a")
    stats.record("a", True, 10, 1)
    stats.record("b", False, 10, 1)
    assert before.success.count == 1 and stats.snapshot("a").success.count == 2
    assert stats.snapshot("b").fail.count == 1 and stats.snapshot("b").success.count == 0
    stats.forget("a")
    assert stats.snapshot("a") == EMPTY and stats.models() == ["b"]


def test_negative_durations_are_clamped() -> None:
    stats, _ = _stats()
    stats.record("m", True, -5, 1, queue_ns=-1, compute_ns=-1)
    snap = stats.snapshot("m")
    assert snap.success == Duration(1, 0) and snap.queue == Duration(1, 0) and snap.compute_infer == Duration(1, 0)
