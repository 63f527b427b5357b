"""Metric names and labels of the cache service, declared in one place."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0)


class CacheMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.queries = Counter(
            "unimodel_cache_queries", "Cache lookups by result (exact_hit, semantic_hit, miss, error)",
            ["result"], registry=registry,
        )
        self.inserts = Counter("unimodel_cache_inserted_entries", "Entries stored", registry=registry)
        self.evictions = Counter(
            "unimodel_cache_evictions", "Entries evicted, by reason (ttl, max_entries_per_scope, max_entries_per_tenant, max_entries)",
            ["reason"], registry=registry,
        )
        self.guard = Counter(
            "unimodel_cache_guard_rejections", "Candidates above the threshold refused by the guard", registry=registry
        )
        self.ambiguous = Counter(
            "unimodel_cache_ambiguous_misses", "Misses because two entries with different answers matched alike",
            registry=registry,
        )
        self.verified = Counter(
            "unimodel_cache_verifications",
            "Lookups the verification stage decided, by verdict (accepted: a hit; rejected: every candidate refused)",
            ["verdict"], registry=registry,
        )
        self.refreshed = Counter(
            "unimodel_cache_refreshed_entries",
            "Inserted entries the scope already held (same question and answer, e.g. a retry): refreshed, not duplicated",
            registry=registry,
        )
        self.late_writes = Counter(
            "unimodel_cache_writes_past_deadline",
            "Inserts and removals refused because they could not commit before their deadline (nothing stored)",
            ["op"], registry=registry,
        )
        self.cleanup_pending = Gauge(
            "unimodel_cache_vector_cleanup_pending",
            "Ids whose vectors Milvus may hold without an entry, waiting to be deleted (evicted, removed, failed inserts)",
            registry=registry,
        )
        self.cleanup_failures = Counter(
            "unimodel_cache_vector_cleanup_failures",
            "Rounds of vector deletion that failed (Milvus unreachable); retried on the next round",
            registry=registry,
        )
        self.log_rows = Counter(
            "unimodel_cache_hit_log_rows_written", "Hit log rows written to the scalar store (in batches)",
            registry=registry,
        )
        self.flushes = Counter(
            "unimodel_cache_hit_log_flushes", "Batches of hits and hit log rows written to the scalar store",
            registry=registry,
        )
        self.flush_failures = Counter(
            "unimodel_cache_hit_log_flush_failures",
            "Batches of hits the scalar store refused (kept for the next round; no request fails for it)",
            registry=registry,
        )
        self.log_dropped = Counter(
            "unimodel_cache_hit_log_rows_dropped",
            "Hit log rows dropped because the store refused them for longer than the buffer holds",
            registry=registry,
        )
        self.entries = Gauge("unimodel_cache_entries", "Entries stored (all scopes)", registry=registry)
        self.stage = Histogram(
            "unimodel_cache_stage_seconds", "Time of a lookup's stages (embed, search, verify, total)", ["stage"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )
