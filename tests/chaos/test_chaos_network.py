"""Network faults of one gpu-worker, run in a network namespace of its own joined to the host by a veth
pair (tests/helpers/chaos_net.py); it reaches NATS and etcd through a delaying TCP proxy listening on the host
end of the veth (tests/helpers/delay_proxy.py). Faults: a partition (`ip link set <host veth> down` for 5 s)
and a slow worker (the proxy delays its NATS and etcd connections 200 ms each way for 5 s: user-space, as
Toxiproxy's latency toxic, in place of `tc netem`, which needs a kernel module that some kernels lack).
Recorded as skipped, with the reason, where the namespace cannot be made (no CAP_NET_ADMIN)."""

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
SLOW = (
    "slow-gpu-worker",
    "slow gpu-worker: 200 ms delay each way on its NATS and etcd connections "
    "(user-space delaying proxy, as Toxiproxy's latency toxic; 3 workers, 5 s)",
)
DELAY_MS = 200


@pytest.fixture(scope="module")
def ns_worker(chaos: ChaosCluster, chaos_net: tuple[Netns | None, str]) -> Iterator[Netns | None]:
    net = chaos_net[0]
    if net is None:
        yield None
        return
    try:
        proc = chaos.start_in_netns(NS_WORKER)
        try:
            chaos.wait_ready(NS_WORKER, 120)
            proxied = set(net.proxy.addresses.values()) if net.proxy is not None else set()
            outside = net.peers() - proxied
            assert not outside, f"{NS_WORKER} connects to {sorted(outside)} bypassing the proxy ({sorted(proxied)})"
            yield net
        finally:
            net.heal()
            net.clear()
            proc.stop(20)
            del chaos.procs[NS_WORKER]
    finally:
        net.stop_proxy()  # after the worker: its SIGTERM drain still talks to NATS and etcd


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
    if ns_worker is None:
        skip_row(chaos_report, *SLOW, chaos_net[1])
        pytest.skip(chaos_net[1])
    net = ns_worker

    measure(
        chaos_report, chaos, greedy, fault_id=SLOW[0], fault=SLOW[1], kinds=(TENSOR, STREAM),
        inject=lambda: net.delay(DELAY_MS), recover=net.clear, hold_s=5.0,
    )
