"""A 3-node NATS cluster and a 3-member etcd cluster on free ports, secured as `unimodel up --ha` secures
them (the same process code: unimodel.local.procs), for tests/integration/test_ha.py.

`HaInfra` stands where `helpers.support.Infra` stands: `Services(HaInfra(...))` starts services given every
NATS URL (`--nats-url a,b,c`) and every etcd endpoint (`--etcd-endpoints a,b,c`). Each NATS node has its
monitoring port on, so a test can see which node a service is connected to (`/connz`, the connection's
name is the instance id); `etcd_leader()` asks the members which of them leads. Every process started is
stopped by `stop()`.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from helpers.support import ETCD_PREFIX, TEST_NATS_USER, Infra, LogSink
from unimodel.core.nats_config import ALL, ClusterNode
from unimodel.core.store import EtcdStore
from unimodel.local import binaries
from unimodel.local.credentials import ETCD_USER, LocalCredentials
from unimodel.local.procs import EtcdServer, NatsServer, etcd_initial_cluster, free_port

HOST = "127.0.0.1"


@dataclass
class _Endpoints:
    """What `Services` reads of `infra.nats` / `infra.etcd`: the comma-separated lists."""

    address: str
    url: str = ""

    @property
    def endpoint(self) -> str:
        return self.address


class HaInfra(Infra):
    def __init__(self, tmp: Path, size: int = 3) -> None:  # no super().__init__: other servers
        self.tmp = tmp
        self.sink = LogSink()
        self.credentials = LocalCredentials.ensure(tmp, extra_nats_users=(TEST_NATS_USER,))
        config = self.credentials.write_nats_config({TEST_NATS_USER: ALL})
        password = self.credentials.nats_password_file(TEST_NATS_USER).read_text().strip()
        nodes = [ClusterNode(f"nats-{i}", HOST, free_port()) for i in range(size)]
        self.nats_nodes = [
            NatsServer(
                free_port(), tmp / f"nats-{i}", config_file=config, url_user=(TEST_NATS_USER, password),
                cluster=(node, [n for n in nodes if n is not node]), monitor_port=free_port(),
                sink=self.sink, name=node.name, color=i,
            )
            for i, node in enumerate(nodes)
        ]
        members = [(f"etcd-{i}", HOST, free_port()) for i in range(size)]
        initial = etcd_initial_cluster(members)
        clients = [free_port() for _ in members]
        every = ",".join(f"{HOST}:{p}" for p in clients)
        self.etcd_members = [
            EtcdServer(
                clients[i], peer, tmp / name, member=name, initial_cluster=initial, ctl_endpoints=every,
                sink=self.sink, name=name, color=3 + i,
            )
            for i, (name, _host, peer) in enumerate(members)
        ]
        self.nats = _Endpoints(",".join(n.address for n in self.nats_nodes), ",".join(n.url for n in self.nats_nodes))
        self.etcd = _Endpoints(every)  # type: ignore[assignment]  # Services reads .endpoint alone

    # start / stop -----------------------------------------------------------------------------------
    def start(self) -> None:
        for node in self.nats_nodes:
            node.start_and_wait()
        for member in self.etcd_members:  # all at once: a member is healthy only once the cluster has a leader
            member.start()
        for member in self.etcd_members:
            member.wait_ready(60)
        self.wait_nats_routes()
        creds = self.credentials
        self.etcd_members[0].enable_auth(creds.etcd_root_password, ETCD_USER, creds.etcd_password, ETCD_PREFIX, creds.etcdctl_env())
        for member in self.etcd_members[1:]:
            member.root_env = creds.etcdctl_env()

    def stop(self) -> None:
        for member in self.etcd_members:
            member.stop()
        for node in self.nats_nodes:
            node.stop()

    def store(self) -> EtcdStore:
        """A store client on every member, the running ones first (a new client starts on the first
        endpoint, and its first call to a dead member fails)."""
        members = sorted(self.etcd_members, key=lambda m: not m.alive())
        return EtcdStore([(m.host, m.port) for m in members], auth=self.etcd_auth)

    def etcdctl(self, *args: str) -> str:
        alive = next(m for m in self.etcd_members if m.alive())
        return alive.etcdctl(*args).stdout

    # NATS -------------------------------------------------------------------------------------------
    def _monitor(self, node: NatsServer, path: str) -> dict:
        with urllib.request.urlopen(f"http://{HOST}:{node.monitor_port}/{path}", timeout=2) as r:
            return json.loads(r.read())

    def wait_nats_routes(self, timeout: float = 20) -> None:
        """Until every running node has a route to every other running node."""
        deadline = time.monotonic() + timeout
        while True:
            running = [n for n in self.nats_nodes if n.alive()]
            try:
                if all(self._monitor(n, "routez")["num_routes"] >= len(running) - 1 for n in running):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("NATS nodes did not connect their routes")
            time.sleep(0.1)

    def connections(self) -> dict[str, int]:
        """Connection name (a service's instance id) -> index of the NATS node it is connected to."""
        out: dict[str, int] = {}
        for i, node in enumerate(self.nats_nodes):
            if not node.alive():
                continue
            try:
                conns = self._monitor(node, "connz?limit=1024")["connections"] or []
            except OSError:
                continue
            for conn in conns:
                if conn.get("name"):
                    out[conn["name"]] = i
        return out

    def node_of(self, name: str) -> int | None:
        return self.connections().get(name)

    # etcd -------------------------------------------------------------------------------------------
    def etcd_status(self) -> list[dict]:
        """`etcdctl endpoint status` of every member that answers (member id, leader id, endpoint)."""
        out = []
        for member in self.etcd_members:
            if not member.alive():
                continue
            ctl = [str(binaries.etcd().parent / "etcdctl"), "--endpoints", member.endpoint, "--command-timeout", "1s"]
            done = subprocess.run([*ctl, "endpoint", "status", "-w", "json"], capture_output=True, text=True, timeout=10,
                                  env={**os.environ, **member.root_env})
            if done.returncode == 0:
                for doc in json.loads(done.stdout):
                    out.append({"endpoint": doc["Endpoint"], "member": doc["Status"]["header"]["member_id"],
                                "leader": doc["Status"]["leader"]})
        return out

    def etcd_leader(self) -> int | None:
        """Index of the running member that says it leads (its /metrics: etcd_server_is_leader 1; fast,
        no client needed), or None."""
        for i, member in enumerate(self.etcd_members):
            if not member.alive():
                continue
            try:
                with urllib.request.urlopen(f"http://{member.host}:{member.port}/metrics", timeout=1) as r:
                    if b"\netcd_server_is_leader 1" in r.read():
                        return i
            except OSError:
                continue
        return None

    def etcd_leader_by_status(self) -> int | None:
        """Index of the member that leads as `etcdctl endpoint status` of the answering members agrees, or None."""
        status = self.etcd_status()
        leaders = {s["leader"] for s in status}
        if len(leaders) != 1:
            return None
        leader = leaders.pop()
        for s in status:
            if s["member"] == leader:
                return next(i for i, m in enumerate(self.etcd_members) if s["endpoint"].endswith(f":{m.port}"))
        return None


def merge_ha_report(path: Path, faults: dict[str, object], *, what: str, command: str) -> None:
    """Add `faults` to the HA report at `path` (docs/benchmarks/ha.json), keeping the faults other test
    modules recorded there: each module says what it ran and how in `runs`."""
    report = json.loads(path.read_text()) if path.is_file() else {}
    report.setdefault("faults", {}).update(faults)
    report.setdefault("runs", {})[command] = {
        "what": what, "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%MZ"),
        "machine": f"{os.cpu_count()} CPU cores, shared",
    }
    for old in ("what", "date", "command", "machine"):  # the layout of a report of one module
        report.pop(old, None)
    path.write_text(json.dumps(report, indent=2) + "\n")
