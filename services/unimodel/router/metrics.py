"""Metric names and labels of the router, declared in one place.

The `model` label is a model some worker serves (the table's), else core/dispatch.py's OTHER_MODEL, so client
input cannot grow it; the outcomes are core/dispatch.py's. The router counts only the batches of batchers that
have no routing table yet (the batchers count what they dispatch themselves: batcher/metrics.py).
Worker counts are read from the worker table when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

DECISION_BUCKETS = (0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.005)
ROUTE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


WorkerStates = Callable[[], dict[str, int]]
"""Workers known to the router by state ("ready", "suspended")."""


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry, worker_states: WorkerStates) -> None:
        self.routed = Counter(
            "unimodel_router_routed",
            "Batches routed, by model and outcome (ok, retried, not_served, unavailable, busy: every instance's slots were taken)",
            ["model", "outcome"], registry=registry,
        )
        self.decision = Histogram(
            "unimodel_router_decision_seconds", "Time to choose a worker for a batch (the routing policy alone)",
            registry=registry, buckets=DECISION_BUCKETS,
        )
        self.duration = Histogram(
            "unimodel_router_batch_duration_seconds", "From a batch's arrival to its worker's acknowledgement",
            ["model"], registry=registry, buckets=ROUTE_BUCKETS,
        )
        registry.register(_WorkersCollector(worker_states))

    def decided(self, seconds: float) -> None:
        self.decision.observe(seconds)

    def batch(self, model: str, outcome: str, seconds: float) -> None:
        self.routed.labels(model, outcome).inc()
        self.duration.labels(model).observe(seconds)


class _WorkersCollector(Collector):
    def __init__(self, states: WorkerStates) -> None:
        self.states = states

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("unimodel_router_workers", "Workers the router knows, by state", labels=["state"])

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for state, n in self.states().items():
            family.add_metric([state], n)
        yield family
