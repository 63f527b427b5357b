"""Per-model inference statistics of the gateway, in Triton's vocabulary. Plain logic, no transport.

The gateway records every KServe infer request it answered: success or failure, its duration at the
gateway (end to end, in nanoseconds) and the rows it carried. `snapshot(model)` returns an immutable
copy that the KServe statistics endpoints render in Triton's format (kserve.statistics_entry), which is
what perf_analyzer reads before and after each measurement window.

What the gateway cannot see by itself is optional in `record`: time queued in the batcher, compute time
in the worker, and the rows of the batch the request ran in. Every successful request is counted in the
queue and compute statistics, as Triton counts them (perf_analyzer picks the model version whose queue
count grew, and requires equal compute counts); their nanoseconds are what the worker reported, else 0,
so perf_analyzer then shows the whole latency as overhead. Without batch sizes every successful request
counts as one execution, which is what Triton reports for a model that does not batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class Duration:
    """Triton's StatisticDuration: how many, and their cumulative nanoseconds."""

    count: int = 0
    ns: int = 0


@dataclass(frozen=True, slots=True)
class BatchSnapshot:
    """Executions of one batch size (Triton's InferBatchStatistics): compute input / infer / output."""

    batch_size: int
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


@dataclass(frozen=True, slots=True)
class ModelSnapshot:
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = Duration()
    fail: Duration = Duration()
    queue: Duration = Duration()
    compute_input: Duration = Duration()
    compute_infer: Duration = Duration()
    compute_output: Duration = Duration()
    batches: tuple[BatchSnapshot, ...] = ()


@dataclass(slots=True)
class _Counter:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns

    def frozen(self) -> Duration:
        return Duration(self.count, self.ns)


@dataclass(slots=True)
class _Batch:
    # Fractional executions: a request of r rows in a batch of b rows is r/b of that batch's execution.
    executions: float = 0.0
    compute_ns: float = 0.0


@dataclass(slots=True)
class _Model:
    last_inference_ms: int = 0
    inference_count: int = 0
    executions: float = 0.0
    success: _Counter = field(default_factory=_Counter)
    fail: _Counter = field(default_factory=_Counter)
    queue: _Counter = field(default_factory=_Counter)
    compute_infer: _Counter = field(default_factory=_Counter)
    compute_other: _Counter = field(default_factory=_Counter)  # input and output: counted, no time of their own
    batches: dict[int, _Batch] = field(default_factory=dict)


EMPTY = ModelSnapshot()


def _sum(a: Duration, b: Duration) -> Duration:
    return Duration(a.count + b.count, a.ns + b.ns)


def combine(a: ModelSnapshot, b: ModelSnapshot) -> ModelSnapshot:
    """The statistics of one model on two gateways, added up (batch sizes matched; the latest inference)."""
    sizes: dict[int, BatchSnapshot] = {x.batch_size: x for x in a.batches}
    for x in b.batches:
        y = sizes.get(x.batch_size)
        sizes[x.batch_size] = x if y is None else BatchSnapshot(
            x.batch_size, _sum(x.compute_input, y.compute_input), _sum(x.compute_infer, y.compute_infer),
            _sum(x.compute_output, y.compute_output),
        )
    return ModelSnapshot(
        last_inference_ms=max(a.last_inference_ms, b.last_inference_ms),
        inference_count=a.inference_count + b.inference_count,
        execution_count=a.execution_count + b.execution_count,
        success=_sum(a.success, b.success), fail=_sum(a.fail, b.fail), queue=_sum(a.queue, b.queue),
        compute_input=_sum(a.compute_input, b.compute_input), compute_infer=_sum(a.compute_infer, b.compute_infer),
        compute_output=_sum(a.compute_output, b.compute_output),
        batches=tuple(sizes[k] for k in sorted(sizes)),
    )


class StatsView(Protocol):
    """Model statistics to answer from: one gateway's (ModelStatistics) or the cluster's (kserve/cluster_stats.py)."""

    def snapshot(self, model: str) -> ModelSnapshot: ...
    def models(self) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class MergedStats:
    """Snapshots added up over gateways: `answered` of the `expected` gateways answered."""

    by_model: dict[str, ModelSnapshot]
    answered: int = 1
    expected: int = 1

    def snapshot(self, model: str) -> ModelSnapshot:
        return self.by_model.get(model, EMPTY)

    def models(self) -> list[str]:
        return sorted(self.by_model)


class ReplyTimes(NamedTuple):
    """What a worker's InferResponse reports of its batch (ModelStatistics.record's optional fields)."""

    queue_ns: int
    compute_ns: int
    batch_rows: int


class ModelStatistics:
    """Cumulative statistics per model name (never reset while the gateway runs, as in Triton)."""

    def __init__(self, clock_ms: Callable[[], int] = _now_ms) -> None:
        self._clock_ms = clock_ms
        self._models: dict[str, _Model] = {}

    def record(
        self,
        model: str,
        success: bool,
        duration_ns: int,
        rows: int,
        *,
        queue_ns: int | None = None,
        compute_ns: int | None = None,
        batch_rows: int = 0,
    ) -> None:
        """One answered request. `rows`: rows it carried (0 counts as 1). Optional, when the worker
        reports them: `queue_ns` (time waiting for a batch), `compute_ns` (engine time of its batch),
        `batch_rows` (rows of the batch it ran in)."""
        stats = self._models.get(model)
        if stats is None:
            stats = self._models[model] = _Model()
        duration_ns = max(0, int(duration_ns))
        stats.last_inference_ms = self._clock_ms()
        if not success:
            stats.fail.add(duration_ns)
            return
        rows = max(1, int(rows))
        stats.success.add(duration_ns)
        stats.inference_count += rows
        share = min(1.0, rows / batch_rows) if batch_rows > 0 else 1.0
        stats.executions += share
        # Every successful request is counted as queued and computed, as Triton counts them (perf_analyzer
        # finds the model version whose queue count grew); the time is what the worker reported, else 0.
        stats.queue.add(max(0, int(queue_ns or 0)))
        compute_ns = max(0, int(compute_ns or 0))
        stats.compute_infer.add(compute_ns)
        stats.compute_other.add(0)
        if batch_rows > 0:
            batch = stats.batches.get(batch_rows)
            if batch is None:
                batch = stats.batches[batch_rows] = _Batch()
            batch.executions += share
            batch.compute_ns += compute_ns * share

    def snapshot(self, model: str) -> ModelSnapshot:
        """An immutable copy of the model's statistics (all zero for a model with no request yet)."""
        stats = self._models.get(model)
        if stats is None:
            return EMPTY
        batches = []
        for size in sorted(stats.batches):
            batch = stats.batches[size]
            count = round(batch.executions)
            batches.append(
                BatchSnapshot(size, Duration(count, 0), Duration(count, round(batch.compute_ns)), Duration(count, 0))
            )
        other = stats.compute_other.frozen()
        return ModelSnapshot(
            last_inference_ms=stats.last_inference_ms,
            inference_count=stats.inference_count,
            execution_count=round(stats.executions),
            success=stats.success.frozen(),
            fail=stats.fail.frozen(),
            queue=stats.queue.frozen(),
            compute_input=other,
            compute_infer=stats.compute_infer.frozen(),
            compute_output=other,
            batches=tuple(batches),
        )

    def models(self) -> list[str]:
        return sorted(self._models)

    def forget(self, model: str) -> None:
        """Drop a model's statistics (when it is unregistered)."""
        self._models.pop(model, None)
