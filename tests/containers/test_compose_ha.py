"""compose/docker-compose.ha.yml under a real Docker engine (run by scripts/test-containers after
test_compose_cluster.py, on the images it built): three NATS nodes in one cluster and three etcd members in one
raft group, every service given all of them; a NATS node (the gateway's) and the etcd leader killed under load
lose no request, a worker started while both are down registers and serves, the killed nodes rejoin, and
`down -v` leaves nothing. The third-party services are stand-ins (tests/containers/compose.test.yml and
compose.ha.test.yml).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers.compose_cluster import ComposeCluster, compose_up, docker, inspect, report
from helpers.predict_load import PredictLoad
from unimodel.local.cluster import SERVICES
from unimodel.local.procs import wait_until

pytestmark = pytest.mark.timeout(900)

SIX = [name for name, _module in SERVICES]
NATS_NODES, ETCD_MEMBERS = ["nats", "nats-1", "nats-2"], ["etcd", "etcd-1", "etcd-2"]
ETCD_URLS = ",".join(f"http://{m}:2379" for m in ETCD_MEMBERS)


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeCluster]:
    """Every container healthy, the extra NATS nodes and etcd members too."""
    services = [*NATS_NODES, *ETCD_MEMBERS, *SIX]
    with compose_up(tmp_path_factory.mktemp("ha-secrets"), services, Path("/tmp/unimodel-test-containers-ha.log"), ha=True) as c:
        yield c


def container(c: ComposeCluster, service: str) -> str:
    (name,) = c.containers(service)
    return name


def nats_monitor(c: ComposeCluster, node: str, path: str) -> dict[str, Any]:
    """A NATS node's monitoring endpoint (port 8222 inside its container, not published)."""
    out = docker("exec", container(c, node), "wget", "-q", "-O", "-", f"http://127.0.0.1:8222/{path}", timeout=30)
    return dict(json.loads(out))


def nats_users(c: ComposeCluster, node: str) -> list[str]:
    """The NATS users connected to a node: one per service container (the user is the service kind)."""
    conns = nats_monitor(c, node, "connz?auth=true&limit=1024")["connections"] or []
    return sorted(str(conn.get("authorized_user", "")) for conn in conns)


def routed(c: ComposeCluster, nodes: list[str]) -> bool:
    """Every node routes to the other two (a route each way between each pair)."""
    return all(int(nats_monitor(c, n, "routez")["num_routes"]) >= 2 for n in nodes)


def etcd_status(c: ComposeCluster, via: str) -> dict[str, tuple[int, int]]:
    """member name -> (member id, the leader it knows), for the members that answer; `etcdctl endpoint status`
    (a maintenance call: it answers with authentication on) run in the container `via`."""
    out = docker("exec", container(c, via), "etcdctl", f"--endpoints={ETCD_URLS}", "--command-timeout=3s",
                 "endpoint", "status", "-w", "json", timeout=30, check=False)
    status: dict[str, tuple[int, int]] = {}
    for entry in json.loads(out or "[]"):
        name = entry["Endpoint"].removeprefix("http://").split(":")[0]
        status[name] = (int(entry["Status"]["header"]["member_id"]), int(entry["Status"]["leader"]))
    return status


def etcd_leader(c: ComposeCluster, via: str, members: list[str]) -> str | None:
    """The member every answering member of `members` names as leader, if they all answer and agree."""
    status = etcd_status(c, via)
    if sorted(status) != sorted(members) or len({leader for _, leader in status.values()}) != 1:
        return None
    leader = next(iter(status.values()))[1]
    return next((name for name, (member, _) in status.items() if member == leader), None)


def test_three_nats_nodes_route_to_each_other_and_three_etcd_members_agree_on_a_leader(ha: ComposeCluster) -> None:
    wait_until(lambda: routed(ha, NATS_NODES), 60, "every NATS node routed to the other two", every_s=1)
    leader = wait_until(lambda: etcd_leader(ha, "etcd", ETCD_MEMBERS), 60, "one etcd leader", every_s=1)
    spread = {node: nats_users(ha, node) for node in NATS_NODES}
    connected = sorted(user for users in spread.values() for user in users)
    # every service container holds a NATS connection on one of the nodes
    assert set(SIX) <= set(connected), spread
    report(f"HA: NATS routes complete; etcd leader {leader}; NATS clients per node {spread}")


def test_a_nats_node_and_the_etcd_leader_killed_under_load_lose_nothing(ha: ComposeCluster) -> None:
    """SIGKILL (`docker kill`) the NATS node the gateway is connected to and the etcd leader while 6 clients send
    predicts: every request is answered right; the services reconnect to the other nodes, the two remaining
    members elect a leader, and a gpu-worker started in the outage registers and takes traffic. `up` starts the
    killed containers again (a manual stop is not restarted by the policy) and they rejoin."""
    wait_until(lambda: ha.models_ready({"delay": 2}), 300, "delay on 2 workers", every_s=1)
    node = next(n for n in NATS_NODES if "gateway" in nats_users(ha, n))
    leader = etcd_leader(ha, "etcd", ETCD_MEMBERS)
    assert leader is not None
    alive_nodes = [n for n in NATS_NODES if n != node]
    alive_members = [m for m in ETCD_MEMBERS if m != leader]
    before = set(ha.containers("gpu-worker"))
    killed_ids = {name: inspect(container(ha, name))["Id"] for name in (node, leader)}
    with PredictLoad(ha.base, "delay", clients=6, headers=ha.auth) as load:
        time.sleep(3)
        docker("kill", container(ha, node))
        docker("kill", container(ha, leader))
        killed = time.monotonic()
        new_leader = wait_until(lambda: etcd_leader(ha, alive_members[0], alive_members), 60,
                                "a leader among the two members left", every_s=0.5)
        elected_s = time.monotonic() - killed
        wait_until(lambda: "gateway" in [u for n in alive_nodes for u in nats_users(ha, n)], 60,
                   "the gateway on another NATS node", every_s=0.5)
        reconnected_s = time.monotonic() - killed
        # a worker that starts while a NATS node and an etcd member are down
        ha.compose("up", "-d", "--no-build", "--no-recreate", "--no-deps", "--scale", "gpu-worker=3", "gpu-worker",
                   timeout=300)
        (new,) = set(ha.containers("gpu-worker")) - before
        ha.wait_healthy(["gpu-worker"], 180)
        wait_until(lambda: ha.models_ready({"delay": 3}), 180, "delay on 3 workers", every_s=1)
        time.sleep(3)
    failures = load.failures()
    # upper bounds: each look goes through `docker exec`, and etcdctl waits 3 s on the dead member
    line = (f"{node} (the gateway's) and etcd leader {leader} killed under load: new leader {new_leader} seen "
            f"{elected_s:.1f} s after, the gateway on another node seen {reconnected_s:.1f} s after; "
            f"{load.ok} answers, {len(failures)} failed")
    assert load.ok > 0 and not failures, (line, failures[:5])
    workers = ha.workers_answering("delay")
    assert len(workers) == 3, workers
    report(f"HA: {line}; {new} started in the outage and served")

    ha.compose("up", "-d", "--no-build", "--no-recreate", "--no-deps", node, leader, timeout=300)
    ha.wait_healthy([node, leader], 120)
    wait_until(lambda: routed(ha, NATS_NODES), 60, f"{node} routed again", every_s=1)
    back = wait_until(lambda: etcd_leader(ha, "etcd-1", ETCD_MEMBERS), 60, f"{leader} back in the raft group", every_s=1)
    # the same containers, started again on their volumes (not new ones)
    assert {name: inspect(container(ha, name))["Id"] for name in (node, leader)} == killed_ids
    report(f"HA: {node} and {leader} rejoined (leader {back})")


def test_down_v_leaves_nothing(ha: ComposeCluster) -> None:
    ha.down()
    assert ha.leftovers() == {"containers": [], "volumes": [], "networks": []}
