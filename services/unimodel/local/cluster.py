"""`unimodel up`: nats-server, etcd, Milvus Lite and the six services as child processes of one supervisor.

With `--ha`, three nats-server nodes joined in one NATS cluster and three etcd members in one etcd cluster
(HaPorts: fixed ports counted from --nats-port, --nats-cluster-port and --etcd-port, each checked before
the start); every service is given all three NATS URLs and all three etcd endpoints and fails over between
them. A node or member that dies is restarted by the supervisor like any other child and rejoins.

State (NATS JetStream store, etcd data, Milvus Lite's file, the cache's SQLite store) lives under one
directory, resolved to an absolute path at the start (children get absolute paths only) and locked, so a
second `up` on the same state directory is refused. Every child's log line is prefixed with its name.
A child that exits on its own is logged with its exit code and started again after a backoff
(local/supervisor.py), as compose's restart policy does; the cluster stops only on Ctrl-C / SIGTERM, or
when a child fails repeatedly (or refuses its settings), naming it. Stopping stops the services (they
drain), then Milvus, etcd and NATS; any child still alive after its timeout is killed, so no process is
left behind.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from unimodel.core import errors, modelconfig, nats_config
from unimodel.core.settings import CommonSettings
from unimodel.core.subjects import Permissions
from unimodel.local.binaries import BinaryNotFound
from unimodel.local.credentials import ETCD_USER, NATS_CONFIG, LocalCredentials
from unimodel.local.procs import (
    EtcdServer,
    ManagedProcess,
    MilvusLiteServer,
    NatsServer,
    etcd_initial_cluster,
    free_port,
    http_ok,
    port_in_use,
)
from unimodel.local.supervisor import GiveUp, RestartPolicy, Supervisor

# (CLI name, module) in start order; the gateway last so it is ready when the rest is.
SERVICES: list[tuple[str, str]] = [
    ("router", "unimodel.router"),
    ("batcher", "unimodel.batcher"),
    ("cache", "unimodel.cache"),
    ("embedding-worker", "unimodel.embedder"),
    ("gpu-worker", "unimodel.worker"),
    ("gateway", "unimodel.gateway"),
]


VLLM_ENGINE = "vllm"
LOOPBACK_UPSTREAMS = ["http://127.0.0.1", "http://localhost", "http://[::1]"]
"""upstream_urls of `up`'s gateway and workers unless set: an openai-engine model may front a server on
this host (llama.cpp's server, `vllm serve`) and nothing else."""

LOCK_FILE = "up.lock"
"""In the state directory: flock-ed by the `unimodel up` that uses it, holding its pid."""


HA_SIZE = 3
"""Nodes of the NATS cluster and members of the etcd cluster of `unimodel up --ha`."""


@dataclass(frozen=True)
class HaPorts:
    """The ports of `up --ha` on one host: NATS node i serves clients on nats_port + i and its cluster
    routes on cluster_port + i; etcd member i serves clients on etcd_port + 2i and its peers on
    etcd_port + 2i + 1 (defaults: NATS 4222-4224, routes 6222-6224, etcd 2379/2380, 2381/2382, 2383/2384)."""

    nats_port: int = 4222
    cluster_port: int = 6222
    etcd_port: int = 2379
    size: int = HA_SIZE

    def nats(self, i: int) -> tuple[int, int]:
        """(client port, route port) of NATS node i."""
        return self.nats_port + i, self.cluster_port + i

    def etcd(self, i: int) -> tuple[int, int]:
        """(client port, peer port) of etcd member i."""
        return self.etcd_port + 2 * i, self.etcd_port + 2 * i + 1

    def all(self) -> list[tuple[str, int]]:
        """Every port with what it is for (the flag that moves it), to check before starting."""
        out = []
        for i in range(self.size):
            client, route = self.nats(i)
            out += [(f"NATS node {i} (--nats-port)", client), (f"NATS node {i} routes (--nats-cluster-port)", route)]
        for i in range(self.size):
            client, peer = self.etcd(i)
            out += [(f"etcd member {i} (--etcd-port)", client), (f"etcd member {i} peers (--etcd-port)", peer)]
        return out


class InstanceUsers:
    """One NATS user per running service process (local/credentials.py): `renew` makes a new instance id
    and user for a process about to start, drops the user of its previous run, rewrites the nats-server
    configuration and has every running node reload it (with --ha every node includes the same file)."""

    def __init__(self, credentials: LocalCredentials, nats: list[NatsServer], extra_users: dict[str, Permissions]) -> None:
        self.credentials, self.nats, self.extra_users = credentials, nats, extra_users
        self.kinds: dict[str, str] = {}  # running instance id -> service kind

    def write_config(self) -> Path:
        return self.credentials.write_nats_config(self.extra_users, instances=self.kinds)

    def renew(self, kind: str, previous: str = "") -> str:
        if previous:
            self.kinds.pop(previous, None)
            self.credentials.drop_instance(previous)
        instance_id = f"{kind}-{secrets.token_hex(4)}"
        password = self.credentials.mint_instance(instance_id).read_text().strip()
        self.kinds[instance_id] = kind
        self.write_config()
        for node in self.nats:
            node.reload(instance_id, password)
        return instance_id


class ServiceProcess(ManagedProcess):
    """A service child of `up`: each start, the first and every restart, is a new instance with a NATS user
    of its own (InstanceUsers)."""

    def __init__(self, name: str, argv: list[str], kind: str, users: InstanceUsers, env: dict[str, str], **kw) -> None:
        super().__init__(name, argv, env=env, **kw)
        self.kind, self.users, self.base_env = kind, users, env
        self.instance_id = ""

    def start(self) -> None:
        self.instance_id = self.users.renew(self.kind, self.instance_id)
        self.env = {**self.base_env, **self.users.credentials.instance_env(self.kind, self.instance_id)}
        super().start()


def state_dir_holder(state_dir: Path) -> int | None:
    """The pid of the `unimodel up` that holds `state_dir` (0 if it wrote none), or None when none does."""
    try:
        lock = (state_dir / LOCK_FILE).open("r")
    except FileNotFoundError:
        return None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            text = lock.read().strip()
            return int(text) if text.isdigit() else 0
        fcntl.flock(lock, fcntl.LOCK_UN)
    return None


class ClusterError(Exception):
    """One line for the operator."""


@dataclass
class ClusterConfig:
    state_dir: Path = Path(".unimodel")
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    nats_port: int = 4222
    etcd_port: int = 2379
    workers: int = 1
    embedding_workers: int = 1
    milvus_port: int = 0  # 0 = a free port
    config: str | None = None
    log_level: str = "info"
    lease_ttl_s: int | None = None
    ready_timeout_s: float = 180.0
    model_repository: Path | None = None  # default: <state_dir>/models
    prepare_models: bool = True
    load_models: str = "all"
    vllm_workers: int = 0  # gpu-workers run from the vllm venv (they host the vllm engine's models)
    vllm_python: str | None = None  # default: .venv-vllm/bin/python beside the venv `up` runs from
    extra_env: dict[str, str] = field(default_factory=dict)
    # A NATS user allowed every subject, its credentials in `cluster.nats.url`: for tools that put their own
    # clients on the cluster's NATS (scripts/bench/hops.py), never given to a service. "" = none.
    nats_tool_user: str = ""
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    ha: bool = False  # three NATS nodes and three etcd members (HaPorts) instead of one of each
    nats_cluster_port: int = 6222  # with ha: the first NATS node's cluster route port

    @property
    def ha_ports(self) -> HaPorts:
        return HaPorts(self.nats_port, self.nats_cluster_port, self.etcd_port)

    def __post_init__(self) -> None:
        # Once, here: every child gets absolute paths, whatever directory it runs in.
        self.state_dir = Path(self.state_dir).expanduser().resolve()
        if self.model_repository is not None:
            self.model_repository = Path(self.model_repository).expanduser().resolve()
        if self.config:
            self.config = str(Path(self.config).expanduser().resolve())
        if self.vllm_python:
            self.vllm_python = str(Path(self.vllm_python).expanduser().absolute())


class LocalCluster:
    def __init__(self, cfg: ClusterConfig, sink: IO[str] | None = None) -> None:
        self.cfg = cfg
        self.sink = sink if sink is not None else sys.stdout
        self.nats: NatsServer | None = None  # the first node (of nats_nodes)
        self.etcd: EtcdServer | None = None  # the first member (of etcd_members)
        self.nats_nodes: list[NatsServer] = []
        self.etcd_members: list[EtcdServer] = []
        self.milvus: MilvusLiteServer | None = None
        self.services: list[ManagedProcess] = []
        self.credentials: LocalCredentials | None = None
        self.instance_users: InstanceUsers | None = None
        self.stopping = threading.Event()  # Ctrl-C / SIGTERM: start() gives up waiting
        self.supervisor = Supervisor(cfg.restart, say=self._warn)
        self._lock: IO[str] | None = None
        self._color = 0

    # ----------------------------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        self.sink.write(text + "\n")
        self.sink.flush()

    def _warn(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def _lock_state_dir(self) -> None:
        """One `up` per state directory: two would share etcd's data and the cache's files."""
        lock = (self.cfg.state_dir / LOCK_FILE).open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise ClusterError(
                f"state directory {self.cfg.state_dir} is in use by another `unimodel up` "
                f"(pid {state_dir_holder(self.cfg.state_dir) or '?'}); stop it or choose another --state-dir"
            ) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._lock = lock

    def _check_ports(self) -> None:
        c = self.cfg
        if c.ha:
            for what, port in c.ha_ports.all():
                if port_in_use(port, c.host):
                    raise ClusterError(f"{what}: port {port} on {c.host} is in use (choose other ports with that flag)")
        for what, port in (("HTTP", c.http_port), ("gRPC", c.grpc_port), ("NATS", c.nats_port), ("etcd", c.etcd_port)):
            if port and port_in_use(port, c.host):
                flag = {"HTTP": "--http-port", "gRPC": "--grpc-port", "NATS": "--nats-port", "etcd": "--etcd-port"}[what]
                raise ClusterError(f"{what} port {port} on {c.host} is in use (choose another with {flag})")

    def _env(self) -> dict[str, str]:
        """A child's environment, without credentials (ServiceProcess adds its instance's)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("UNIMODEL_NATS_", "UNIMODEL_ETCD_")) or k == "UNIMODEL_ETCD_PREFIX"}
        env.pop("UNIMODEL_INSTANCE_ID", None)
        env.update(self.cfg.extra_env)
        env["UNIMODEL_NATS_URL"] = self.nats_urls
        env["UNIMODEL_ETCD_ENDPOINTS"] = self.etcd_endpoints
        env["PYTHONUNBUFFERED"] = "1"
        if not self.cfg.config and "UNIMODEL_UPSTREAM_URLS" not in env:
            # openai-engine models may front servers on this host only (a --config file says otherwise)
            env["UNIMODEL_UPSTREAM_URLS"] = json.dumps(LOOPBACK_UPSTREAMS)
        if self.cfg.config:
            env["UNIMODEL_CONFIG"] = self.cfg.config
        return env

    def _service(
        self, name: str, module: str, args: list[str], label: str | None = None, python: str = sys.executable
    ) -> ManagedProcess:
        argv = [python, "-m", module, "--host", self.cfg.host, "--log-level", self.cfg.log_level, *args]
        if self.cfg.lease_ttl_s:
            argv += ["--lease-ttl-s", str(self.cfg.lease_ttl_s)]
        self._color += 1
        assert self.instance_users is not None
        proc = ServiceProcess(label or name, argv, name, self.instance_users, self._env(), sink=self.sink, color=self._color)
        proc.start()
        self.services.append(proc)
        self.supervisor.watch(proc)
        return proc

    def start(self) -> None:
        c = self.cfg
        c.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock_state_dir()
        self._check_ports()
        try:
            self._make_bus_and_store()
            self.milvus = MilvusLiteServer(
                c.milvus_port or free_port(c.host), c.state_dir / "milvus", host=c.host, sink=self.sink, color=3
            )
        except BinaryNotFound as exc:
            raise ClusterError(str(exc)) from None
        repository = self.repository()
        vllm_python = self._vllm_python() if c.vllm_workers else ""
        if c.prepare_models:
            self._prepare_models(repository)
        self.start_bus_and_store()
        assert self.etcd is not None and self.milvus is not None
        self._start_infra(self.milvus)
        try:
            stale = self.etcd.revoke_leases()  # nothing of ours runs yet: any registration is a dead process's
        except (OSError, subprocess.SubprocessError) as exc:
            stale = 0
            self._warn(f"unimodel up: could not clear the last run's registrations from etcd ({exc}); they expire with their TTL")
        if stale:
            self._warn(f"unimodel up: removed {stale} registration(s) left in etcd by the last run's processes")
        for name, module in SERVICES:
            if name == "gateway":
                self._service(
                    name, module,
                    ["--http-port", str(c.http_port), "--grpc-port", str(c.grpc_port),
                     "--model-repository", str(repository), "--load-models", self._load_list(repository)],
                )
            elif name == "gpu-worker":
                for i in range(c.workers):
                    self._service(name, module, [], label=f"gpu-worker-{i}" if c.workers > 1 else name)
                for i in range(c.vllm_workers):
                    label = f"vllm-worker-{i}" if c.vllm_workers > 1 else "vllm-worker"
                    self._service(name, module, [], label=label, python=vllm_python)
            elif name == "embedding-worker":
                for i in range(c.embedding_workers):
                    self._service(name, module, [], label=f"embedding-worker-{i}" if c.embedding_workers > 1 else name)
            elif name == "cache":
                self._service(
                    name, module,
                    ["--data-dir", str((c.state_dir / "cache").resolve()), "--milvus-uri", self.milvus.uri],
                )
            else:
                self._service(name, module, [])
        ready_url = f"http://{c.host}:{c.http_port}/health/ready"
        deadline = time.monotonic() + c.ready_timeout_s
        while not http_ok(ready_url):
            self.supervise()
            if self.stopping.wait(0.1):
                raise ClusterError("interrupted while starting")
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out after {c.ready_timeout_s:.0f}s waiting for the gateway to report ready")

    def _start_infra(self, infra: NatsServer | EtcdServer | MilvusLiteServer) -> None:
        try:
            infra.start_and_wait()
        except (RuntimeError, TimeoutError) as exc:
            raise ClusterError(str(exc)) from None
        self.supervisor.watch(infra)

    @property
    def nats_urls(self) -> str:
        """Every NATS node's URL, comma separated (the services' --nats-url)."""
        return ",".join(node.address for node in self.nats_nodes)

    @property
    def etcd_endpoints(self) -> str:
        """Every etcd member's host:port, comma separated (the services' --etcd-endpoints)."""
        return ",".join(member.endpoint for member in self.etcd_members)

    def start_bus_and_store(self) -> None:
        """Start NATS (with the services' users and permissions) and etcd, and turn etcd's
        authentication on (once, for the whole etcd cluster with --ha). `start` calls it; a test can call
        it alone."""
        if self.nats is None or self.etcd is None:
            self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
            self._make_bus_and_store()
        assert self.nats is not None and self.etcd is not None
        for node in self.nats_nodes:
            self._start_infra(node)
        for member in self.etcd_members:  # all before waiting: a member is healthy once a quorum runs
            member.start()
        for member in self.etcd_members:
            try:
                member.wait_ready(60)
            except (RuntimeError, TimeoutError) as exc:
                raise ClusterError(str(exc)) from None
            self.supervisor.watch(member)
        self._enable_etcd_auth()

    def _make_bus_and_store(self) -> None:
        """Every run is authenticated: the credentials (made once per state directory), NATS with one
        user per service and its permissions (config file 0600), etcd (auth turned on once started)."""
        c = self.cfg
        tool = (c.nats_tool_user,) if c.nats_tool_user else ()
        self.credentials = LocalCredentials.ensure(c.state_dir, extra_nats_users=tool)
        self.credentials.drop_all_instances()  # a previous run's processes are gone
        url_user = (c.nats_tool_user, self.credentials.nats_password_file(c.nats_tool_user).read_text().strip()) if tool else None
        config_file = self.credentials.folder / NATS_CONFIG
        if c.ha:
            ports = c.ha_ports
            nodes = [nats_config.ClusterNode(f"nats-{i}", c.host, ports.nats(i)[1]) for i in range(ports.size)]
            self.nats_nodes = [
                NatsServer(
                    ports.nats(i)[0], c.state_dir / "nats-cluster" / node.name, host=c.host, config_file=config_file,
                    url_user=url_user, cluster=(node, [n for n in nodes if n is not node]), sink=self.sink, color=0,
                    name=node.name,
                )
                for i, node in enumerate(nodes)
            ]
            members = [(f"etcd-{i}", c.host, ports.etcd(i)[1]) for i in range(ports.size)]
            initial = etcd_initial_cluster(members)
            every = ",".join(f"{c.host}:{ports.etcd(i)[0]}" for i in range(ports.size))
            self.etcd_members = [
                EtcdServer(
                    ports.etcd(i)[0], peer, c.state_dir / "etcd-cluster" / name, host=c.host, member=name,
                    initial_cluster=initial, ctl_endpoints=every, sink=self.sink, color=1, name=name,
                )
                for i, (name, _host, peer) in enumerate(members)
            ]
        else:
            self.nats_nodes = [NatsServer(
                c.nats_port, c.state_dir / "nats", host=c.host, config_file=config_file, url_user=url_user, sink=self.sink, color=0
            )]
            self.etcd_members = [EtcdServer(c.etcd_port, free_port(c.host), c.state_dir, host=c.host, sink=self.sink, color=1)]
        self.nats, self.etcd = self.nats_nodes[0], self.etcd_members[0]
        self.instance_users = InstanceUsers(self.credentials, self.nats_nodes, {u: nats_config.ALL for u in tool})
        self.instance_users.write_config()  # no service user yet: each process gets its own as it starts

    def _enable_etcd_auth(self) -> None:
        assert self.etcd is not None and self.credentials is not None
        creds = self.credentials
        prefix = os.environ.get("UNIMODEL_ETCD_PREFIX") or CommonSettings.model_fields["etcd_prefix"].default
        try:
            self.etcd.enable_auth(creds.etcd_root_password, ETCD_USER, creds.etcd_password, prefix, creds.etcdctl_env())
        except subprocess.CalledProcessError as exc:
            detail = (exc.stderr or "").strip().splitlines()[-1:] or [str(exc)]
            raise ClusterError(f"could not enable etcd authentication: {detail[0]}") from None
        except (OSError, subprocess.SubprocessError) as exc:
            raise ClusterError(f"could not enable etcd authentication: {exc}") from None

    def supervise(self) -> None:
        """Restart children that exited (ClusterError when one fails too often)."""
        try:
            self.supervisor.poll()
        except GiveUp as exc:
            raise ClusterError(str(exc)) from None

    def repository(self) -> Path:
        return (self.cfg.model_repository or self.cfg.state_dir / "models").resolve()

    def _vllm_python(self) -> str:
        """The Python of the vllm venv (scripts/setup makes .venv-vllm beside .venv on x86-64 Linux)."""
        python = Path(self.cfg.vllm_python or Path(sys.prefix).parent / ".venv-vllm" / "bin" / "python")
        if not python.is_file():
            raise ClusterError(
                f"--vllm-workers needs a Python with vllm: {python} does not exist (scripts/setup makes "
                ".venv-vllm on x86-64 Linux; elsewhere give --vllm-python)"
            )
        return str(python)

    def _load_list(self, repository: Path) -> str:
        """What the gateway registers at start: --load-models, where 'all' leaves out the vllm engine's
        models when no vllm worker runs (nothing else could serve them)."""
        c = self.cfg
        if c.load_models != "all" or c.vllm_workers or not repository.is_dir():
            return c.load_models
        names = []
        for folder in sorted(repository.iterdir()):
            if not (folder / modelconfig.CONFIG_FILE).is_file():
                continue
            try:
                engine = modelconfig.load(folder).engine
            except errors.UnimodelError:
                engine = ""  # the gateway says what is wrong with it
            if engine != VLLM_ENGINE:
                names.append(folder.name)
        return ",".join(names)

    def _prepare_models(self, repository: Path) -> None:
        """Build the demo model repository (skips what is prepared already); the vllm demo model too
        when vllm workers run."""
        argv = [sys.executable, "-m", "unimodel.cli", "models", "prepare", "--repository", str(repository)]
        if self.cfg.vllm_workers:
            from unimodel.models import CATALOG

            wanted = [n for n, spec in CATALOG.items() if spec.default or spec.config().engine == VLLM_ENGINE]
            argv += ["--only", ",".join(wanted)]
        proc = ManagedProcess("models", argv, env=self._env(), sink=self.sink, color=2)
        proc.start()
        code = None
        while code is None:
            if self.stopping.is_set():
                proc.stop(10.0)
                raise ClusterError("interrupted while preparing the demo models")
            code = proc.wait(0.2)
        if code != 0:
            raise ClusterError(f"preparing the demo models failed (exit {code}); see the lines above")

    def endpoints(self) -> str:
        c = self.cfg
        return "\n".join(
            [
                "UniModel is up:",
                f"  HTTP   http://{c.host}:{c.http_port}   (GET /v1/models, POST /v1/models/<model>:predict, /v2 KServe, /docs)",
                f"  gRPC   {c.host}:{c.grpc_port}   (unimodel.v1.InferenceService, inference.GRPCInferenceService, health)",
                f"  models {self.repository()}",
                f"  NATS   {self.nats_urls or '-'}   etcd {self.etcd_endpoints or '-'}"
                f"   Milvus Lite {self.milvus.uri if self.milvus else '-'}",
                f"  state  {c.state_dir.resolve()}",
                f"  auth   {self.credentials.folder if self.credentials else '-'}   (NATS: one user per process; etcd: user unimodel)",
                "Press Ctrl-C to stop.",
            ]
        )

    def stop(self) -> None:
        """Stop services (in parallel, they drain), then etcd and NATS. Idempotent; leaves no process."""
        threads = [threading.Thread(target=p.stop, args=(30.0,)) for p in reversed(self.services)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for infra in (self.milvus, *self.etcd_members, *self.nats_nodes):
            if infra is not None:
                infra.stop(10.0)
        if self.credentials is not None:
            self.credentials.drop_all_instances()
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None


def parse_args(argv: list[str] | None) -> ClusterConfig:
    p = argparse.ArgumentParser(prog="unimodel up", description="Start the local UniModel cluster.")
    p.add_argument("--state-dir", default=os.environ.get("UNIMODEL_STATE_DIR", ".unimodel"), help="state directory")
    p.add_argument("--host", default="127.0.0.1", help="address every server binds to (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--nats-port", type=int, default=4222, help="NATS client port (with --ha: of the first node; the others +1, +2)")
    p.add_argument(
        "--etcd-port", type=int, default=2379,
        help="etcd client port (with --ha: member i serves clients on this + 2i and peers on this + 2i + 1)",
    )
    p.add_argument(
        "--ha", action="store_true",
        help="a 3-node NATS cluster and a 3-member etcd cluster instead of one of each; every service gets "
        "all their addresses and fails over between them",
    )
    p.add_argument("--nats-cluster-port", type=int, default=6222, help="with --ha: the first NATS node's route port (the others +1, +2)")
    p.add_argument("--workers", type=int, default=1, help="number of gpu-workers (default 1)")
    p.add_argument(
        "--vllm-workers", type=int, default=0,
        help="gpu-workers run from the vllm venv, for the vllm engine's models (default 0; the demo model "
        "smollm2-135m-instruct-vllm is prepared and registered only with one or more)",
    )
    p.add_argument("--vllm-python", default=None, help="Python with vllm for those (default: .venv-vllm beside this venv)")
    p.add_argument("--embedding-workers", type=int, default=1, help="number of embedding-workers (default 1)")
    p.add_argument("--milvus-port", type=int, default=0, help="Milvus Lite gRPC port (default: a free port)")
    p.add_argument("--config", help="YAML settings file passed to every service")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--lease-ttl-s", type=int, default=None, help="etcd lease TTL of every service")
    p.add_argument("--model-repository", default=None, help="model repository folder (default <state-dir>/models)")
    p.add_argument("--no-prepare", action="store_true", help="do not build the demo models into the repository")
    p.add_argument(
        "--load-models", default="all", help="repository models to register at start: 'all', names, or '' for none"
    )
    a = p.parse_args(argv)
    if a.workers < 1:
        p.error("--workers must be at least 1")
    if a.vllm_workers < 0:
        p.error("--vllm-workers must be 0 or more")
    if a.embedding_workers < 0:
        p.error("--embedding-workers must be 0 or more (0: the gpu-workers embed)")
    for name in ("http_port", "grpc_port", "nats_port", "etcd_port", "nats_cluster_port"):
        if not 0 < getattr(a, name) < 65536:
            p.error(f"--{name.replace('_', '-')} must be a port number (1-65535)")
    return ClusterConfig(
        state_dir=Path(a.state_dir), host=a.host, http_port=a.http_port, grpc_port=a.grpc_port,
        nats_port=a.nats_port, etcd_port=a.etcd_port, workers=a.workers, config=a.config,
        embedding_workers=a.embedding_workers, milvus_port=a.milvus_port,
        log_level=a.log_level, lease_ttl_s=a.lease_ttl_s,
        model_repository=Path(a.model_repository) if a.model_repository else None,
        prepare_models=not a.no_prepare, load_models=a.load_models,
        vllm_workers=a.vllm_workers, vllm_python=a.vllm_python, ha=a.ha, nats_cluster_port=a.nats_cluster_port,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    cluster = LocalCluster(cfg)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: cluster.stopping.set())
    code = 0
    try:
        cluster.start()
        print(cluster.endpoints(), flush=True)
        while not cluster.stopping.wait(0.2):
            cluster.supervise()
    except ClusterError as exc:
        print(f"unimodel up: error: {exc}", file=sys.stderr)
        code = 1
    finally:
        print("unimodel up: stopping ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        cluster.stop()
        print(f"unimodel up: stopped in {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)
    return code
