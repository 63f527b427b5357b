"""Network faults of one gpu-worker, run in a network namespace of its own joined to the host by a veth
pair (tests/helpers/chaos_net.py): a partition (`ip link set <host veth> down` for 5 s) and a slow worker
(netem delay 200 ms on both ends of the veth). Recorded as skipped, with the reason, where the namespace or
netem cannot be made (no CAP_NET_ADMIN, no sch_netem)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from helpers.chaos_cluster import ChaosCluster
from helpers.chaos_faults import STREAM, TENSOR, measure, skip_row, streaming_worker
from helpers.chaos_load import Greedy
from helpers.chaos_net import Netns
from helpers.chaos_report import Report

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

NS_WORKER = "worker-ns"
PARTITION = ("partition-gpu-worker", "network partition of one gpu-worker (3 workers, 5 s)")
SLOW = ("slow-gpu-worker", "slow gpu-worker: netem delay 200 ms each way (3 workers, 5 s)")


@pytest.fixture(scope="module")
def ns_worker(chaos: ChaosCluster, chaos_net: tuple[Netns | None, str]) -> Iterator[Netns | None]:
    net = chaos_net[0]
    if net is None:
        yield None
        return
    proc = chaos.start_in_netns(NS_WORKER)
    try:
        chaos.wait_ready(NS_WORKER, 120)
        yield net
    finally:
        net.heal()
        net.clear()
        proc.stop(20)
        del chaos.procs[NS_WORKER]


def test_partition(
    chaos: ChaosCluster, chaos_report: Report, greedy: Greedy | None, ns_worker: Netns | None, chaos_net: tuple[Netns | None, str]
) -> None:
    if ns_worker is None:
        skip_row(chaos_report, *PARTITION, chaos_net[1])
        pytest.skip(chaos_net[1])
    net = ns_worker

    def inject() -> None:
        streaming_worker([NS_WORKER], NS_WORKER)  # (waits up to 3 s for a stream on it: migration is exercised)
        net.partition()

    def recover() -> None:
        net.heal()
        chaos.wait_ready(NS_WORKER, 90)

    measure(
        chaos_report, chaos, greedy, fault_id=PARTITION[0], fault=PARTITION[1], kinds=(TENSOR, STREAM),
        inject=inject, recover=recover, hold_s=5.0, zero_failed=True,
    )


def test_slow_worker(
    chaos: ChaosCluster, chaos_report: Report, greedy: Greedy | None, ns_worker: Netns | None, chaos_net: tuple[Netns | None, str]
) -> None:
    why = chaos_net[1] if ns_worker is None else ns_worker.netem_missing()
    if why:
        skip_row(chaos_report, *SLOW, why)
        pytest.skip(why)
    assert ns_worker is not None
    net = ns_worker

    measure(
        chaos_report, chaos, greedy, fault_id=SLOW[0], fault=SLOW[1], kinds=(TENSOR, STREAM),
        inject=lambda: net.delay(200), recover=net.clear, hold_s=5.0,
    )
