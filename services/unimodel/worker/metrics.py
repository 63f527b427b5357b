"""Metric names and labels of a worker (gpu-worker and embedding-worker), declared in one place.

The `model` label takes the names of models loaded here (a worker loads only what the router placed or
its settings name), so it cannot grow with client input. Load and loaded models are read from the model
table when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

BATCH_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)
RATE_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000)

ModelLoads = Callable[[], Iterable[tuple[str, str, int, int, int, int]]]
"""Per model: name, state, batches in flight, slots, the most in flight at once, batches refused busy."""
"""(model, state name, in-flight batches or sequences, capacity) per model of the table."""


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry, loads: ModelLoads) -> None:
        self.batches = Counter(
            "unimodel_worker_batches", "Batches run, by model and status (ok, failed: every request of it failed, "
            "partial)", ["model", "status"], registry=registry,
        )
        self.batch_duration = Histogram(
            "unimodel_worker_batch_duration_seconds", "Time a batch took on the engine (compute, after its slot)",
            ["model"], registry=registry, buckets=BATCH_BUCKETS,
        )
        self.generations = Counter(
            "unimodel_worker_generations", "Generations ended, by model and finish reason (stop, length, abort, error)",
            ["model", "finish_reason"], registry=registry,
        )
        self.generated_tokens = Counter(
            "unimodel_worker_generated_tokens", "Completion tokens generated, by model", ["model"], registry=registry
        )
        self.ttft = Histogram(
            "unimodel_worker_time_to_first_token_seconds",
            "From a generation's arrival at the worker to its first output token", ["model"],
            registry=registry, buckets=TTFT_BUCKETS,
        )
        self.itl = Histogram(
            "unimodel_worker_inter_token_latency_seconds", "Time between two chunks of output tokens of a generation",
            ["model"], registry=registry, buckets=ITL_BUCKETS,
        )
        self.tokens_per_second = Histogram(
            "unimodel_worker_tokens_per_second", "Decode rate of a finished generation (tokens after the first / time)",
            ["model"], registry=registry, buckets=RATE_BUCKETS,
        )
        registry.register(_LoadCollector(loads))

    def batch(self, model: str, compute_s: float, failed: int, total: int) -> None:
        status = "ok" if not failed else "failed" if failed == total else "partial"
        self.batches.labels(model, status).inc()
        self.batch_duration.labels(model).observe(compute_s)

    def first_token(self, model: str, seconds: float) -> None:
        self.ttft.labels(model).observe(seconds)

    def inter_token(self, model: str, seconds: float) -> None:
        self.itl.labels(model).observe(seconds)

    def generation_done(self, model: str, reason: str, tokens: int, decode_s: float) -> None:
        self.generations.labels(model, reason).inc()
        if tokens:
            self.generated_tokens.labels(model).inc(tokens)
        if tokens > 1 and decode_s > 0:
            self.tokens_per_second.labels(model).observe((tokens - 1) / decode_s)


class _LoadCollector(Collector):
    def __init__(self, loads: ModelLoads) -> None:
        self.loads = loads

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, CounterMetricFamily]:
        return (
            GaugeMetricFamily(
                "unimodel_worker_inflight_batches",
                "Batches (generations: sequences) running on the worker now, by model", labels=["model"],
            ),
            GaugeMetricFamily(
                "unimodel_worker_capacity", "Batches (sequences) a model runs at once on this worker", labels=["model"]
            ),
            GaugeMetricFamily(
                "unimodel_worker_models", "Models in the worker's table, by state (LOADING, READY, FAILED, ...)",
                labels=["state"],
            ),
            GaugeMetricFamily(
                "unimodel_worker_inflight_batches_peak",
                "The most batches (generations: sequences) a model had in flight on the worker at once", labels=["model"],
            ),
            CounterMetricFamily(
                "unimodel_worker_batches_busy",
                "Batches refused because every slot of their model was taken (the batcher sends them again)",
                labels=["model"],
            ),
        )

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        inflight, capacity, models, peak, busy = self._families()
        states: dict[str, int] = {}
        for model, state, load, cap, most, refused in self.loads():
            inflight.add_metric([model], load)
            capacity.add_metric([model], cap)
            peak.add_metric([model], most)
            busy.add_metric([model], refused)
            states[state] = states.get(state, 0) + 1
        for state, n in states.items():
            models.add_metric([state], n)
        yield from (inflight, capacity, models, peak, busy)
