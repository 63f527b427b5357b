"""kill -9 and SIGTERM of each service kind under load, one at a time, on the shared chaos cluster; the
process is started again (same arguments) before the next fault. Gateway: two replicas called in client-side
round robin, gateway-1 is the victim; batcher, router and embedding-worker: two replicas, the `-0` one is
the victim; gpu-worker: two replicas, the victim is one serving a stream at that moment (worker-0 when none
does within 3 s); cache: a single one (no replica exists)."""

from __future__ import annotations

import signal

import pytest

from helpers.chaos_cluster import ChaosCluster
from helpers.chaos_faults import CACHE, EMBEDDING, PERF, STREAM, TENSOR, measure, streaming_worker
from helpers.chaos_load import Greedy
from helpers.chaos_report import Report

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

VICTIMS = {  # service kind -> (process, loads)
    "gateway": ("gateway-1", (TENSOR, STREAM)),
    "batcher": ("batcher-0", (TENSOR, PERF)),
    "router": ("router-0", (TENSOR, PERF)),
    "gpu-worker": ("worker-0", (TENSOR, STREAM, PERF)),
    "embedding-worker": ("embedder-0", (EMBEDDING,)),
    "cache": ("cache-0", (CACHE,)),
}
SIGNALS = {"kill9": (signal.SIGKILL, "kill -9"), "sigterm": (signal.SIGTERM, "SIGTERM")}
REPLICATED_HOPS = ("batcher", "router", "gpu-worker")  # "0 failed" applies: another replica exists


@pytest.mark.parametrize("how", list(SIGNALS))
@pytest.mark.parametrize("kind", list(VICTIMS))
def test_kill(chaos: ChaosCluster, chaos_report: Report, greedy: Greedy | None, kind: str, how: str) -> None:
    default, kinds = VICTIMS[kind]
    victim = [default]
    replicas = 1 if kind == "cache" else 2

    def inject() -> None:
        if kind == "gpu-worker" and chaos.has_llm:  # the worker of a running stream, so migration is exercised
            victim[0] = streaming_worker(["worker-0", "worker-1"], default)
        chaos.kill(victim[0], SIGNALS[how][0])

    measure(
        chaos_report, chaos, greedy,
        fault_id=f"{how}-{kind}",
        fault=f"{SIGNALS[how][1]} {kind} ({replicas} {'replica' if replicas == 1 else 'replicas'})",
        kinds=kinds,
        inject=inject,
        recover=lambda: chaos.restart(victim[0]),
        zero_failed=kind in REPLICATED_HOPS,
    )
