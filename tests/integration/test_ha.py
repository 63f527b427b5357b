"""Issue 17, HA substrate: a 3-node NATS cluster and a 3-member etcd cluster, every service given all three
NATS URLs and all three etcd endpoints (helpers/ha_cluster.py), 2 gateways, 2 batchers, 2 routers and 2
workers of the delay model, under a steady load of concurrent clients that call the gateways in round
robin and retry a request on a connection error (counted).

In order, on one cluster: SIGKILL the NATS node gateway-0 is connected to; SIGKILL the etcd leader; SIGKILL
one gateway; one batcher; one router. Each must cost 0 failed requests (retries on a dead gateway's
connection are allowed and counted), and the substrate must recover within 5 s (NATS: every service that
was on the dead node is connected to another; etcd: a new leader, and a lease refresh through our store
client succeeds).

With UNIMODEL_HA_REPORT=path the figures are written there as JSON (docs/benchmarks/ha.json).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from helpers.chaos_load import OK, Load, NoGateway, Result, percentile, tensor_call
from helpers.ha_cluster import HaInfra, merge_ha_report
from helpers.support import LogSink, Services, delay_model, etcd_instances, register_model
from unimodel.core.store import EtcdStore, StoreError
from unimodel.local.cluster import ClusterConfig, HaPorts, LocalCluster
from unimodel.local.procs import ManagedProcess, free_port, http_ok, port_in_use, wait_until

pytestmark = pytest.mark.integration

MODEL = "slow"
DELAY_MS = 50
CLIENTS = 24
DEADLINE_S = 30.0
RECOVERY_TARGET_S = 5.0
LEASE_TTL_S = 3
REPORT: dict[str, dict] = {}


class RetryingLoad(Load):
    """chaos_load.Load whose client sends a request again to the next gateway when the connection fails
    (refused, or broken before the answer: inference is idempotent); every such retry is counted."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.retries: list[tuple[float, str]] = []

    async def _round_robin(self, client: httpx.AsyncClient, seq: int) -> tuple[str, str]:
        first = self._next
        self._next += 1
        errors = []
        for k in range(2 * len(self.gateways)):
            url = self.gateways[(first + k) % len(self.gateways)]
            try:
                return await self.call(client, url, seq)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                self.retries.append((time.monotonic(), type(exc).__name__))
                errors.append(type(exc).__name__)
                await asyncio.sleep(0.02)
        raise NoGateway(", ".join(errors))


class HaCluster:
    def __init__(self, infra: HaInfra, services: Services) -> None:
        self.infra, self.services = infra, services
        self.procs: dict[str, ManagedProcess] = {}
        self.gateways: list[str] = []

    def start(self) -> None:
        s = self.services
        self.procs.update(s.start_named("router-0", "router-1", "batcher-0", "batcher-1", "worker-0", "worker-1"))
        register_model(self.infra, delay_model(MODEL, DELAY_MS, max_batch_size=8, max_queue_delay_ms=5))
        for i in range(2):
            http, grpc_port = free_port(), free_port()
            name = f"gateway-{i}"
            self.procs[name] = s.start("gateway", "--instance-id", name, "--http-port", str(http), "--grpc-port", str(grpc_port), name=name)
            self.gateways.append(f"http://127.0.0.1:{http}")
        for name, url in zip(("gateway-0", "gateway-1"), self.gateways, strict=True):
            wait_until(lambda url=url: http_ok(f"{url}/health/ready"), 90, f"{name} ready", self.procs[name])
        s.http_port = int(self.gateways[0].rsplit(":", 1)[1])
        s.wait_models([MODEL], instances=2)
        wait_until(lambda: set(self.infra.connections()) >= set(self.procs), 30, "every service on NATS")

    def load(self) -> RetryingLoad:
        """Clients of the gateways still running (a killed one stays dead)."""
        live = [url for name, url in zip(("gateway-0", "gateway-1"), self.gateways, strict=True) if self.procs[name].alive()]
        echo = tensor_call(MODEL)

        async def call(client: httpx.AsyncClient, url: str, seq: int) -> tuple[str, str]:
            return await echo(client, url, seq % 2**24)  # FP32 holds integers up to 2**24 exactly

        return RetryingLoad("ha", live, call, concurrency=CLIENTS, deadline_s=DEADLINE_S)


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HaCluster]:
    infra = HaInfra(tmp_path_factory.mktemp("ha"))
    services = Services(infra, lease_ttl_s=LEASE_TTL_S)
    cluster = HaCluster(infra, services)
    try:
        infra.start()
        cluster.start()
        yield cluster
    finally:
        services.stop()
        infra.stop()
    path = os.environ.get("UNIMODEL_HA_REPORT")
    if path and REPORT:
        merge_ha_report(
            Path(path), REPORT,
            what="tests/integration/test_ha.py: faults injected one after another under load into one cluster of "
                 "3 NATS nodes, 3 etcd members, 2 gateways, 2 batchers, 2 routers, 2 workers (delay model "
                 f"{DELAY_MS} ms per batch), {CLIENTS} concurrent clients calling the gateways in round robin "
                 "and retrying a request on a connection error",
            command=f"UNIMODEL_HA_REPORT={path} .venv/bin/python -m pytest tests/integration/test_ha.py -q",
        )


def _figures(load: RetryingLoad, killed_at: float, baseline: list[Result]) -> dict:
    """Requests in flight at the kill or sent after it: sent, failed, retried, and when latency was back."""
    during = [r for r in load.results if r.ended >= killed_at]
    base_p99 = percentile([r.seconds for r in baseline if r.outcome == OK], 99) or 0.1
    slow = max(3 * base_p99, 1.0)  # over 1 s: a request sent again (path watch, reconnect) after its first send was lost
    slow_ends = [r.ended for r in during if r.seconds > slow]
    retries = [kind for t, kind in load.retries if t >= killed_at]
    return {
        "requests_sent": len(during),
        "requests_failed": sum(r.outcome != OK for r in during),
        "requests_retried": len(retries),
        "retried_refused": sum(kind in ("ConnectError", "ConnectTimeout") for kind in retries),
        "retried_broken": sum(kind not in ("ConnectError", "ConnectTimeout") for kind in retries),
        "baseline_p99_ms": round(base_p99 * 1000, 1),
        "max_latency_ms": round(max((r.seconds for r in during), default=0.0) * 1000, 1),
        "latency_recovery_s": round(max(slow_ends, default=killed_at) - killed_at, 2),
        "latency_recovery_means": f"from the kill until the last request slower than {slow * 1000:.0f} ms "
                                  "(3x the baseline p99, at least 1 s) ended",
    }


def _failures(load: RetryingLoad, killed_at: float) -> list[str]:
    return [f"{r.started - killed_at:+.2f}s {r.outcome} {r.detail}" for r in load.results if r.ended >= killed_at and r.outcome != OK]


def _wait(check, timeout: float, step: float = 0.02) -> float | None:
    """Seconds until `check()` is true (None if not within `timeout`)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if check():
                return time.monotonic() - start
        except Exception:
            pass
        time.sleep(step)
    return None


@pytest.mark.parametrize("service", ["gateway-0", "worker-0", "router-0", "batcher-0"])
def test_kill_the_nats_node_a_service_is_on(ha: HaCluster, service: str) -> None:
    """SIGKILL the node `service` is connected to (services on other nodes lose what was passing through
    it); afterwards the node is started again on its store, as `unimodel up`'s supervisor does."""
    infra = ha.infra
    with ha.load() as load:
        time.sleep(3.0)
        node = infra.node_of(service)
        assert node is not None
        on_node = sorted(name for name, i in infra.connections().items() if i == node and name in ha.procs)
        baseline = list(load.results)
        killed_at = time.monotonic()
        infra.nats_nodes[node].kill()
        reconnected = _wait(lambda: all(infra.node_of(name) not in (None, node) for name in on_node), 30)
        time.sleep(6.0)
    infra.nats_nodes[node].restart()
    infra.wait_nats_routes()
    figures = _figures(load, killed_at, baseline)
    figures |= {"killed": f"nats node {node}, the one {service} was connected to (SIGKILL)", "services_on_it": on_node,
                "recovery_s": None if reconnected is None else round(reconnected, 2),
                "recovery_means": "from the kill until every service that was on the node is connected to another"}
    REPORT["nats_node" if service == "gateway-0" else f"nats_node_of_{service}"] = figures
    print(json.dumps(figures, indent=1))
    assert reconnected is not None, f"{on_node} did not reconnect"
    assert figures["requests_sent"] > 100
    failures = _failures(load, killed_at)
    assert not failures, f"{len(failures)} failed: {failures[:8]}"
    assert reconnected <= RECOVERY_TARGET_S


def _registrations(infra: HaInfra) -> set[str]:
    """The instance keys in etcd; a client's first call to a dead member fails (the store client then moves
    to the next endpoint), so a few tries."""
    for _ in range(10):
        try:
            return set(etcd_instances(infra))
        except StoreError:
            time.sleep(0.2)
    return set(etcd_instances(infra))


async def _refresh_after(store: EtcdStore, lease: int, started: float, timeout: float) -> float | None:
    while time.monotonic() - started < timeout:
        try:
            if await store.refresh_lease(lease) > 0:
                return time.monotonic() - started
        except StoreError:
            await asyncio.sleep(0.05)
    return None


def test_kill_the_etcd_leader(ha: HaCluster) -> None:
    infra = ha.infra
    before = _registrations(infra)
    leader = infra.etcd_leader()
    assert leader is not None
    # our own client, talking to the leader first: how long until a lease refresh goes through again
    members = infra.etcd_members
    order = [members[leader], *(m for i, m in enumerate(members) if i != leader)]
    store = EtcdStore([(m.host, m.port) for m in order], auth=infra.etcd_auth)
    loop = asyncio.new_event_loop()
    try:
        lease = loop.run_until_complete(store.grant_lease(LEASE_TTL_S))
        with ha.load() as load:
            time.sleep(3.0)
            baseline = list(load.results)
            killed_at = time.monotonic()
            members[leader].kill()
            with ThreadPoolExecutor(1) as pool:  # watch for the new leader while our client refreshes
                election = pool.submit(_wait, lambda: infra.etcd_leader() not in (None, leader), 30, 0.05)
                refreshed = loop.run_until_complete(_refresh_after(store, lease, killed_at, 30))
                elected = election.result()
            time.sleep(max(0.0, 2 * LEASE_TTL_S - (time.monotonic() - killed_at)))
            after = _registrations(infra)
            time.sleep(2.0)
    finally:
        loop.run_until_complete(store.close())
        loop.close()
        members[leader].restart()  # rejoins on its data dir
        members[leader].wait_ready(60)
    figures = _figures(load, killed_at, baseline)
    figures |= {"killed": f"etcd member {leader}, the leader (SIGKILL)",
                "leader_elected_s": None if elected is None else round(elected, 2),
                "lease_refresh_s": None if refreshed is None else round(refreshed, 2),
                "recovery_s": None if refreshed is None else round(refreshed, 2),
                "recovery_means": "from the kill until a lease refresh through a client that talked to the leader succeeded",
                "registrations_kept": sorted(before & after) == sorted(before), "registrations": len(before)}
    REPORT["etcd_leader"] = figures
    print(json.dumps(figures, indent=1))
    assert refreshed is not None and refreshed <= RECOVERY_TARGET_S, figures
    assert before <= after, f"registrations lost with the leader: {sorted(before - after)}"
    failures = _failures(load, killed_at)
    assert not failures, f"{len(failures)} failed: {failures[:8]}"


@pytest.mark.parametrize("victim", ["gateway-1", "batcher-0", "router-0"])
def test_kill_one_of_two(ha: HaCluster, victim: str) -> None:
    with ha.load() as load:
        time.sleep(3.0)
        baseline = list(load.results)
        killed_at = time.monotonic()
        ha.procs[victim].kill()
        time.sleep(8.0)
    figures = _figures(load, killed_at, baseline)
    figures |= {"killed": f"{victim} (SIGKILL), one of two",
                "recovery_s": figures["latency_recovery_s"], "recovery_means": figures["latency_recovery_means"]}
    REPORT[victim.rsplit("-", 1)[0]] = figures
    print(json.dumps(figures, indent=1))
    assert figures["requests_sent"] > 100
    failures = _failures(load, killed_at)
    assert not failures, f"{len(failures)} failed: {failures[:8]}"
    if victim.startswith("gateway"):
        assert figures["requests_retried"] > 0  # the client did meet the dead gateway


def _free_ha_ports() -> dict[str, int]:
    """Base ports for `up --ha` whose every derived port (HaPorts.all) is free now."""
    for _ in range(50):
        ports = HaPorts(free_port(), free_port(), free_port())
        if not any(port_in_use(p) for _, p in ports.all()):
            return {"nats_port": ports.nats_port, "nats_cluster_port": ports.cluster_port, "etcd_port": ports.etcd_port}
    raise RuntimeError("no free ports for a 3-node cluster")


def test_up_ha_runs_a_nats_cluster_and_an_etcd_cluster_and_restarts_a_dead_member(tmp_path: Path) -> None:
    """`unimodel up --ha`'s infrastructure alone (LocalCluster.start_bus_and_store): three NATS nodes that
    route to each other, three etcd members with authentication on, and the supervisor restarting a
    SIGKILLed node and member, which rejoin."""
    cfg = ClusterConfig(state_dir=tmp_path / "state", ha=True, prepare_models=False, nats_tool_user="tool", **_free_ha_ports())
    cluster = LocalCluster(cfg, sink=LogSink())
    try:
        cluster.start_bus_and_store()
        assert [n.name for n in cluster.nats_nodes] == ["nats-0", "nats-1", "nats-2"]
        assert cluster.nats_urls.count("nats://") == 3 and cluster.etcd_endpoints.count(",") == 2

        async def across(first: str, last: str) -> bytes:  # a request on one node, answered on another
            import nats

            a, b = await nats.connect(first), await nats.connect(last)
            try:
                async def pong(msg) -> None:
                    await msg.respond(b"pong")

                await b.subscribe("ha.test", cb=pong)
                await b.flush()
                deadline = time.monotonic() + 10
                while True:
                    try:
                        return (await a.request("ha.test", b"", timeout=1)).data
                    except Exception:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.1)
            finally:
                await a.close()
                await b.close()

        assert asyncio.run(across(cluster.nats_nodes[0].url, cluster.nats_nodes[2].url)) == b"pong"
        members = cluster.etcd.etcdctl("member", "list").stdout.strip().splitlines()
        assert len(members) == 3 and all("started" in m for m in members)
        for member in cluster.etcd_members:  # authentication is the cluster's: on at every member
            assert member.auth_enabled()
        cluster.nats_nodes[1].kill()
        cluster.etcd_members[1].kill()
        deadline = time.monotonic() + 30
        while not (cluster.supervisor.restarts("nats-1") and cluster.supervisor.restarts("etcd-1")):
            cluster.supervise()
            assert time.monotonic() < deadline, "the supervisor did not restart nats-1 and etcd-1"
            time.sleep(0.1)
        cluster.etcd_members[1].wait_ready(30)
        assert asyncio.run(across(cluster.nats_nodes[1].url, cluster.nats_nodes[0].url)) == b"pong"
        status = cluster.etcd.etcdctl("endpoint", "status", "-w", "json", check=False)
        assert status.stdout.count('"leader"') == 3, status.stdout + status.stderr
    finally:
        cluster.stop()
