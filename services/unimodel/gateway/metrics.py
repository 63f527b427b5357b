"""Metric names and labels of the gateway, declared in one place."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)
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
        self.resent = Counter(
            "unimodel_gateway_requests_resent_total",
            "Waiting requests sent again because the batcher that took them is gone (its process died)",
            registry=registry,
        )

        self.cache_lookups = Counter(
            "unimodel_gateway_cache_lookups_total",
            "Semantic cache outcomes at the gateway by model: hit, miss, bypassed (cache unavailable or too slow)",
            ["model", "outcome"],
            registry=registry,
        )

        self.ttft = Histogram(
            "unimodel_gateway_time_to_first_token_seconds",
            "From a generation request's arrival at the gateway to its first output token, by model",
            ["model"], registry=registry, buckets=TTFT_BUCKETS,
        )
        self.itl = Histogram(
            "unimodel_gateway_inter_token_latency_seconds",
            "Time between two chunks of output tokens as the gateway forwards them, by model",
            ["model"], registry=registry, buckets=ITL_BUCKETS,
        )
        self.tokens = Counter(
            "unimodel_gateway_output_tokens", "Completion tokens streamed or returned to clients, by model",
            ["model"], registry=registry,
        )

        self.migrations = Counter(
            "unimodel_gateway_generation_migrations_total",
            "Running generations whose worker was lost, by model and outcome: moved (another worker continues "
            "it) or failed (none could; the stream ended with an error)",
            ["model", "outcome"], registry=registry,
        )
        self.migration_time = Histogram(
            "unimodel_gateway_generation_migration_seconds",
            "From deciding to move a generation to the new worker's acceptance of it, by model",
            ["model"], registry=registry, buckets=LATENCY_BUCKETS,
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

    # generations (models the gateway serves: labels stay bounded) ---------------------------------------
    def first_token(self, model: str, seconds: float) -> None:
        self.ttft.labels(model).observe(seconds)

    def inter_token(self, model: str, seconds: float) -> None:
        self.itl.labels(model).observe(seconds)

    def migrated(self, model: str, outcome: str, seconds: float) -> None:
        self.migrations.labels(model, outcome).inc()
        if outcome == "moved":
            self.migration_time.labels(model).observe(seconds)

    def output_tokens(self, model: str, n: int) -> None:
        self.tokens.labels(model).inc(n)
