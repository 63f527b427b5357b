"""etcd down for 30 s under load; the suite's last fault (its aftermath is long: the module name sorts last).

Recovery waits until the registrations settle (ChaosCluster.wait_steady): when etcd comes back, the leases
whose keepalives did not resume in time expire a few seconds later and each service registers again when
its reconnect backoff ends; the requests of that aftermath belong to this row."""

from __future__ import annotations

import pytest

from helpers.chaos_cluster import ChaosCluster
from helpers.chaos_faults import TENSOR, measure
from helpers.chaos_load import Greedy
from helpers.chaos_report import Report

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

ETCD_OUTAGE_S = 30.0


def test_etcd_outage(chaos: ChaosCluster, chaos_report: Report, greedy: Greedy | None) -> None:
    def recover() -> None:
        chaos.infra.start_etcd()
        chaos.wait_steady()

    measure(
        chaos_report, chaos, greedy, fault_id="etcd-outage", fault=f"etcd outage ({ETCD_OUTAGE_S:.0f} s)", kinds=(TENSOR,),
        inject=chaos.infra.stop_etcd, recover=recover, hold_s=ETCD_OUTAGE_S,
    )
