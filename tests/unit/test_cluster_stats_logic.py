"""KServe statistics added up over gateways (gateway/kserve/cluster_stats.py, statistics.combine): what one
gateway sends survives the wire, and the sum is the sum of every field."""

from __future__ import annotations

from unimodel.gateway.kserve import cluster_stats
from unimodel.gateway.statistics import EMPTY, Duration, ModelStatistics, combine


def counted(*requests: tuple[str, int, int]) -> ModelStatistics:
    """(model, rows, batch rows) per successful request, each 1 ms with 100 us queue and 400 us compute."""
    stats = ModelStatistics(clock_ms=lambda: 1000)
    for model, rows, batch_rows in requests:
        stats.record(model, True, 1_000_000, rows, queue_ns=100_000, compute_ns=400_000, batch_rows=batch_rows)
    return stats


def test_a_gateways_statistics_survive_the_wire() -> None:
    stats = counted(("a", 1, 4), ("a", 3, 4), ("b", 2, 2))
    stats.record("a", False, 5_000, 1)
    back = cluster_stats.decode(cluster_stats.encode(stats))
    assert set(back) == {"a", "b"}
    for name in back:
        assert back[name] == stats.snapshot(name)


def test_the_sum_over_gateways_adds_every_field_and_matches_batch_sizes() -> None:
    one, two = counted(("a", 4, 4), ("a", 2, 2)), counted(("a", 4, 4), ("b", 1, 1))
    merged = cluster_stats.merge([cluster_stats.decode(cluster_stats.encode(s)) for s in (one, two)])
    a = merged["a"]
    assert a.inference_count == 10 and a.success == Duration(3, 3_000_000) and a.queue == Duration(3, 300_000)
    assert a.compute_infer == Duration(3, 1_200_000) and a.execution_count == 3
    assert [(b.batch_size, b.compute_infer.count) for b in a.batches] == [(2, 1), (4, 2)]
    assert merged["b"] == two.snapshot("b")
    assert combine(EMPTY, a) == a and combine(a, EMPTY) == a
