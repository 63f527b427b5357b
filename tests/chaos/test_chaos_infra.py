"""The infrastructure under load: nats-server restarted, Milvus (the cache's vector store) down. Each is
brought back and the cluster is whole again before the next fault. (etcd's outage: test_chaos_outage_etcd.py,
last.)"""

from __future__ import annotations

import httpx
import pytest

from helpers.chaos_cluster import ChaosCluster
from helpers.chaos_faults import CACHE, STREAM, TENSOR, measure
from helpers.chaos_load import Greedy
from helpers.chaos_report import Report
from unimodel.local.procs import MilvusLiteServer, wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]


def _whole(chaos: ChaosCluster, timeout: float = 90) -> None:
    for name in chaos.procs:
        chaos.wait_ready(name, timeout)


def test_nats_restart(chaos: ChaosCluster, chaos_report: Report, greedy: Greedy | None) -> None:
    def recover() -> None:
        chaos.infra.restart_nats(down_s=0)  # stopped by inject: started again on its port
        _whole(chaos)

    measure(
        chaos_report, chaos, greedy, fault_id="nats-restart", fault="NATS restart (3 s down)", kinds=(TENSOR, STREAM),
        inject=chaos.infra.nats.stop, recover=recover, hold_s=3.0,
    )


def test_milvus_down(chaos: ChaosCluster, chaos_report: Report, greedy: Greedy | None) -> None:
    assert chaos.milvus is not None
    port, data = chaos.milvus.port, chaos.tmp / "milvus"

    def recover() -> None:
        chaos.milvus = MilvusLiteServer(port, data, sink=chaos.infra.sink)
        chaos.milvus.start_and_wait()

        def answers() -> bool:
            doc = '{"type": "query", "scope": {"model": "chaos"}, "query": [{"role": "user", "content": "back?"}]}'
            return httpx.post(f"{chaos.gateways[0]}/modelcache", json=doc, timeout=5).json().get("errorCode") == 0

        wait_until(answers, 60, "the cache to reach Milvus again")

    measure(
        chaos_report, chaos, greedy, fault_id="milvus-down", fault="Milvus down (4 s)", kinds=(CACHE, TENSOR),
        inject=chaos.milvus.stop, recover=recover,
    )
