"""Metric names and labels of the router, declared in one place.

The `model` label is a model some worker serves (the table's), else core/dispatch.py's OTHER_MODEL, so client
input cannot grow it; the outcomes are core/dispatch.py's. The router counts only the batches of batchers that
have no routing table yet (the batchers count what they dispatch themselves: batcher/metrics.py).
Worker counts are read from the worker table when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from unimodel.core.dispatch import DispatchMetrics

WorkerStates = Callable[[], dict[str, int]]
"""Workers known to the router by state ("ready", "suspended")."""


class RouterMetrics(DispatchMetrics):
    def __init__(self, registry: CollectorRegistry, worker_states: WorkerStates) -> None:
        super().__init__(
            registry, batches="unimodel_router_routed", decision="unimodel_router_decision_seconds",
            duration="unimodel_router_batch_duration_seconds",
        )
        registry.register(_WorkersCollector(worker_states))


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
