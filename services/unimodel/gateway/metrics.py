"""Metric names and labels of the gateway, declared in one place."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
UNKNOWN_MODEL = "_unknown"
"""Label for model names the cluster does not serve: client input must not grow label cardinality."""


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "unimodel_gateway_requests_total",
            "Inference requests by API, model and result code",
            ["api", "model", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "unimodel_gateway_request_duration_seconds",
            "Inference request latency at the gateway by API and model",
            ["api", "model"],
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )

        self.cache_lookups = Counter(
            "unimodel_gateway_cache_lookups_total",
            "Semantic cache outcomes at the gateway by model: hit, miss, bypassed (cache unavailable or too slow)",
            ["model", "outcome"],
            registry=registry,
        )

        # labelled children by label values: labels() costs a lock and a tuple build per call
        self._counts: dict[tuple[str, str, str], Counter] = {}
        self._latencies: dict[tuple[str, str], Histogram] = {}

    def observe(self, api: str, model: str, code: str, seconds: float) -> None:
        key = (api, model, code)
        count = self._counts.get(key)
        if count is None:
            count = self._counts[key] = self.requests.labels(api, model, code)
        count.inc()
        latency = self._latencies.get(key[:2])
        if latency is None:
            latency = self._latencies[key[:2]] = self.latency.labels(api, model)
        latency.observe(seconds)


    def cache(self, model: str, outcome: str) -> None:
        self.cache_lookups.labels(model or UNKNOWN_MODEL, outcome).inc()
