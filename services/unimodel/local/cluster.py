"""`unimodel up`: nats-server, etcd, Milvus Lite and the six services as child processes of one supervisor.

State (NATS JetStream store, etcd data, Milvus Lite's file, the cache's SQLite store) lives under one directory. Every child's log line is
prefixed with its name. Ctrl-C or SIGTERM stops the services (they drain), then etcd and NATS; any
child still alive after its timeout is killed, so no process is left behind. If a service exits on its
own, the cluster stops and `up` exits non-zero naming it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from unimodel.local.binaries import BinaryNotFound
from unimodel.local.procs import EtcdServer, ManagedProcess, MilvusLiteServer, NatsServer, free_port, http_ok, port_in_use, wait_until

# (CLI name, module) in start order; the gateway last so it is ready when the rest is.
SERVICES: list[tuple[str, str]] = [
    ("router", "unimodel.router"),
    ("batcher", "unimodel.batcher"),
    ("cache", "unimodel.cache"),
    ("embedding-worker", "unimodel.embedder"),
    ("gpu-worker", "unimodel.worker"),
    ("gateway", "unimodel.gateway"),
]


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
    extra_env: dict[str, str] = field(default_factory=dict)


class LocalCluster:
    def __init__(self, cfg: ClusterConfig, sink: IO[str] | None = None) -> None:
        self.cfg = cfg
        self.sink = sink if sink is not None else sys.stdout
        self.nats: NatsServer | None = None
        self.etcd: EtcdServer | None = None
        self.milvus: MilvusLiteServer | None = None
        self.services: list[ManagedProcess] = []
        self._color = 0

    # ----------------------------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        self.sink.write(text + "\n")
        self.sink.flush()

    def _check_ports(self) -> None:
        c = self.cfg
        for what, port in (("HTTP", c.http_port), ("gRPC", c.grpc_port), ("NATS", c.nats_port), ("etcd", c.etcd_port)):
            if port and port_in_use(port, c.host):
                flag = {"HTTP": "--http-port", "gRPC": "--grpc-port", "NATS": "--nats-port", "etcd": "--etcd-port"}[what]
                raise ClusterError(f"{what} port {port} on {c.host} is in use (choose another with {flag})")

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.cfg.extra_env)
        env["UNIMODEL_NATS_URL"] = self.nats.url if self.nats else ""
        env["UNIMODEL_ETCD_ENDPOINTS"] = self.etcd.endpoint if self.etcd else ""
        env["PYTHONUNBUFFERED"] = "1"
        if self.cfg.config:
            env["UNIMODEL_CONFIG"] = str(Path(self.cfg.config).resolve())
        return env

    def _service(self, name: str, module: str, args: list[str], label: str | None = None) -> ManagedProcess:
        argv = [sys.executable, "-m", module, "--host", self.cfg.host, "--log-level", self.cfg.log_level, *args]
        if self.cfg.lease_ttl_s:
            argv += ["--lease-ttl-s", str(self.cfg.lease_ttl_s)]
        self._color += 1
        proc = ManagedProcess(label or name, argv, env=self._env(), sink=self.sink, color=self._color)
        proc.start()
        self.services.append(proc)
        return proc

    def start(self) -> None:
        c = self.cfg
        self._check_ports()
        c.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.nats = NatsServer(c.nats_port, c.state_dir / "nats", host=c.host, sink=self.sink, color=0)
            self.etcd = EtcdServer(c.etcd_port, free_port(c.host), c.state_dir, host=c.host, sink=self.sink, color=1)
            self.milvus = MilvusLiteServer(
                c.milvus_port or free_port(c.host), c.state_dir / "milvus", host=c.host, sink=self.sink, color=3
            )
        except BinaryNotFound as exc:
            raise ClusterError(str(exc)) from None
        repository = self.repository()
        if c.prepare_models:
            self._prepare_models(repository)
        self.nats.start_and_wait()
        self.etcd.start_and_wait()
        self.milvus.start_and_wait()
        for name, module in SERVICES:
            if name == "gateway":
                self._service(
                    name, module,
                    ["--http-port", str(c.http_port), "--grpc-port", str(c.grpc_port),
                     "--model-repository", str(repository), "--load-models", c.load_models],
                )
            elif name == "gpu-worker":
                for i in range(c.workers):
                    self._service(name, module, [], label=f"gpu-worker-{i}" if c.workers > 1 else name)
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
        gateway = self.services[-1]
        ready_url = f"http://{c.host}:{c.http_port}/health/ready"
        try:
            wait_until(lambda: http_ok(ready_url), c.ready_timeout_s, "the gateway to report ready", gateway)
        except (RuntimeError, TimeoutError) as exc:
            raise ClusterError(str(exc)) from None
        for proc in self.services:
            if not proc.alive():
                raise ClusterError(f"{proc.name} exited with code {proc.returncode()}")

    def repository(self) -> Path:
        return (self.cfg.model_repository or self.cfg.state_dir / "models").resolve()

    def _prepare_models(self, repository: Path) -> None:
        """Build the demo model repository (skips what is prepared already)."""
        argv = [sys.executable, "-m", "unimodel.cli", "models", "prepare", "--repository", str(repository)]
        proc = ManagedProcess("models", argv, env=self._env(), sink=self.sink, color=2)
        proc.start()
        code = proc.wait(1800.0)
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
                f"  NATS   {self.nats.url if self.nats else '-'}   etcd {self.etcd.endpoint if self.etcd else '-'}"
                f"   Milvus Lite {self.milvus.uri if self.milvus else '-'}",
                f"  state  {c.state_dir.resolve()}",
                "Press Ctrl-C to stop.",
            ]
        )

    def failed_service(self) -> ManagedProcess | None:
        for proc in [*self.services, *(p for p in (self.nats, self.etcd, self.milvus) if p)]:
            if not proc.alive():
                return proc
        return None

    def stop(self) -> None:
        """Stop services (in parallel, they drain), then etcd and NATS. Idempotent; leaves no process."""
        threads = [threading.Thread(target=p.stop, args=(30.0,)) for p in reversed(self.services)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for infra in (self.milvus, self.etcd, self.nats):
            if infra is not None:
                infra.stop(10.0)


def parse_args(argv: list[str] | None) -> ClusterConfig:
    p = argparse.ArgumentParser(prog="unimodel up", description="Start the local UniModel cluster.")
    p.add_argument("--state-dir", default=os.environ.get("UNIMODEL_STATE_DIR", ".unimodel"), help="state directory")
    p.add_argument("--host", default="127.0.0.1", help="address every server binds to (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--nats-port", type=int, default=4222)
    p.add_argument("--etcd-port", type=int, default=2379)
    p.add_argument("--workers", type=int, default=1, help="number of gpu-workers (default 1)")
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
    if a.embedding_workers < 0:
        p.error("--embedding-workers must be 0 or more (0: the gpu-workers embed)")
    for name in ("http_port", "grpc_port", "nats_port", "etcd_port"):
        if not 0 < getattr(a, name) < 65536:
            p.error(f"--{name.replace('_', '-')} must be a port number (1-65535)")
    return ClusterConfig(
        state_dir=Path(a.state_dir), host=a.host, http_port=a.http_port, grpc_port=a.grpc_port,
        nats_port=a.nats_port, etcd_port=a.etcd_port, workers=a.workers, config=a.config,
        embedding_workers=a.embedding_workers, milvus_port=a.milvus_port,
        log_level=a.log_level, lease_ttl_s=a.lease_ttl_s,
        model_repository=Path(a.model_repository) if a.model_repository else None,
        prepare_models=not a.no_prepare, load_models=a.load_models,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    cluster = LocalCluster(cfg)
    code = 0
    try:
        cluster.start()
        print(cluster.endpoints(), flush=True)
        while not stop.wait(0.5):
            failed = cluster.failed_service()
            if failed is not None:
                print(f"unimodel up: error: {failed.name} exited with code {failed.returncode()}; stopping", file=sys.stderr)
                code = 1
                break
    except ClusterError as exc:
        print(f"unimodel up: error: {exc}", file=sys.stderr)
        code = 1
    finally:
        print("unimodel up: stopping ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        cluster.stop()
        print(f"unimodel up: stopped in {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)
    return code
