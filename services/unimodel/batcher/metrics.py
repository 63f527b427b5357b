"""Metric names and labels of the batcher, declared in one place.

The `model` label is a registered model's name or OTHER_MODEL (built-in and unregistered models), so
callers cannot grow the label set.

The series written per request or per batch sit on the hot path, so they are plain numbers owned by the
event loop (no lock per observation, unlike prometheus_client's metric objects) and exported by a
collector when Prometheus scrapes; queue depth and in-flight batches are read from the queues then too.
Rejections are rare and use an ordinary Counter.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from unimodel.core.dispatch import DispatchMetrics

OTHER_MODEL = "other"
"""Label of models without a registered config (e.g. the built-in echo)."""

BATCH_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
WAIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
FILL_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

QUEUE_FULL, EXPIRED, INVALID = "queue_full", "expired", "invalid"
"""Reasons a request is rejected by the batcher (label `reason`)."""

QueueStats = Callable[[], Iterable[tuple[str, int, int]]]
"""(model label, queued requests, in-flight batches) per model queue."""


class LoopHistogram:
    """A histogram observed from the event loop only: a bisect and two additions, no lock. The scrape
    thread reads copies (list() of ints is atomic under the GIL)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # bucket "le": value <= bound
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs, +Inf last."""
        total = 0
        out: list[tuple[str, float]] = []
        for bound, n in zip((*self.bounds, float("inf")), list(self.counts), strict=True):
            total += n
            out.append((floatToGoString(bound), total))  # type: ignore[no-untyped-call]  # prometheus_client.utils is unannotated
        return out


class ModelSeries:
    """The hot-path series of one model label."""

    __slots__ = ("batch_rows", "queue_wait", "fill_ratio", "batches_ok", "batches_failed", "batches_busy")

    def __init__(self) -> None:
        self.batch_rows = LoopHistogram(BATCH_ROWS_BUCKETS)
        self.queue_wait = LoopHistogram(WAIT_BUCKETS)
        self.fill_ratio = LoopHistogram(FILL_BUCKETS)
        self.batches_ok = 0
        self.batches_failed = 0
        self.batches_busy = 0  # sends answered busy (every slot taken) and sent again


class BatcherMetrics:
    def __init__(self, registry: CollectorRegistry, queue_stats: QueueStats) -> None:
        self.rejected = Counter(
            "unimodel_batcher_rejected_requests_total",
            "Requests the batcher answered itself without running them, by reason",
            ["model", "reason"],
            registry=registry,
        )
        # batches this batcher sent straight to a worker from the routing table (core/dispatch.py's outcomes)
        self.dispatch = DispatchMetrics(
            registry, batches="unimodel_batcher_dispatched", decision="unimodel_batcher_decision_seconds",
            duration="unimodel_batcher_dispatch_seconds",
        )
        self._series: dict[str, ModelSeries] = {}
        registry.register(_ScrapeCollector(queue_stats, self._series))

    def series(self, label: str) -> ModelSeries:
        s = self._series.get(label)
        if s is None:
            s = self._series[label] = ModelSeries()
        return s

    def reject(self, label: str, reason: str, n: int = 1) -> None:
        self.rejected.labels(label, reason).inc(n)


class _Families(NamedTuple):
    depth: GaugeMetricFamily
    inflight: GaugeMetricFamily
    batch_rows: HistogramMetricFamily
    queue_wait: HistogramMetricFamily
    fill_ratio: HistogramMetricFamily
    batches: CounterMetricFamily


class _ScrapeCollector(Collector):
    """Everything read at scrape time: queue depth, in-flight batches and the hot-path series."""

    def __init__(self, stats: QueueStats, series: dict[str, ModelSeries]) -> None:
        self.stats = stats
        self.series = series

    @staticmethod
    def _families() -> _Families:
        return _Families(
            depth=GaugeMetricFamily(
                "unimodel_batcher_queue_depth", "Requests waiting in the batcher's queues", labels=["model"]
            ),
            inflight=GaugeMetricFamily(
                "unimodel_batcher_inflight_batches", "Batches dispatched and not yet acknowledged", labels=["model"]
            ),
            batch_rows=HistogramMetricFamily(
                "unimodel_batcher_batch_rows",
                "Rows per dispatched batch (each request adds its rows along the batch dimension)",
                labels=["model"],
            ),
            queue_wait=HistogramMetricFamily(
                "unimodel_batcher_queue_wait_seconds",
                "Time a request waited in the batcher's queue before its batch was dispatched",
                labels=["model"],
            ),
            fill_ratio=HistogramMetricFamily(
                "unimodel_batcher_batch_fill_ratio",
                "Rows of a dispatched batch divided by the model's max_batch_size",
                labels=["model"],
            ),
            batches=CounterMetricFamily(
                "unimodel_batcher_batches",
                "Batches dispatched (to a worker, or to a router without a routing table), by result (ok: acknowledged; "
                "failed: every request failed; busy: "
                "every worker slot was taken, sent again)",
                labels=["model", "result"],
            ),
        )

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        f = self._families()
        depth: dict[str, int] = {}
        inflight: dict[str, int] = {}
        for label, queued, batches in self.stats():
            depth[label] = depth.get(label, 0) + queued
            inflight[label] = inflight.get(label, 0) + batches
        for label, value in depth.items():
            f.depth.add_metric([label], value)
        for label, value in inflight.items():
            f.inflight.add_metric([label], value)
        for label, s in list(self.series.items()):  # written by the event loop: copy first
            for family, hist in ((f.batch_rows, s.batch_rows), (f.queue_wait, s.queue_wait), (f.fill_ratio, s.fill_ratio)):
                family.add_metric([label], hist.buckets(), hist.sum)
            f.batches.add_metric([label, "ok"], s.batches_ok)
            f.batches.add_metric([label, "failed"], s.batches_failed)
            f.batches.add_metric([label, "busy"], s.batches_busy)
        yield from f
