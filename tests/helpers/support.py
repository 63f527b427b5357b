"""Test infrastructure: real nats-server, etcd and UniModel services as subprocesses on free ports.

The same process code `unimodel up` uses (unimodel.local.procs). Everything started is stopped by PID.
Secured as `unimodel up` is (unimodel.local.credentials): NATS with one user per service and its
permissions, etcd with authentication on. The tests' own clients stay simple: `infra.nats.url` carries a
NATS user allowed every subject, `infra.etcd_auth` is the services' etcd user, and `infra.etcdctl` runs as
etcd's root.
"""

from __future__ import annotations

import asyncio
import io
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import httpx

from unimodel.core import modelconfig
from unimodel.core.membership import instances_prefix, model_key
from unimodel.core.nats_config import ALL, MAX_PAYLOAD
from unimodel.core.store import EtcdStore
from unimodel.core.transport_security import EtcdAuth
from unimodel.local.credentials import ETCD_USER, LocalCredentials
from unimodel.local.procs import EtcdServer, ManagedProcess, NatsServer, free_port, http_ok, wait_until
from unimodel.v1 import model_pb2, registry_pb2, services_pb2, services_pb2_grpc

MODULES = {
    "gateway": "unimodel.gateway",
    "router": "unimodel.router",
    "batcher": "unimodel.batcher",
    "cache": "unimodel.cache",
    "embedding-worker": "unimodel.embedder",
    "gpu-worker": "unimodel.worker",
}


class LogSink(io.StringIO):
    """Collects prefixed child output; printed by pytest on failure."""

    def write(self, s: str) -> int:
        sys.stderr.write(s)
        return super().write(s)


TEST_NATS_USER = "test"
"""The NATS user of the tests' own clients (in `infra.nats.url`): every subject."""
ETCD_PREFIX = "/unimodel/v1"


class Infra:
    def __init__(self, tmp: Path, *, secure: bool | None = None, max_payload: int = MAX_PAYLOAD) -> None:
        self.tmp = tmp
        self.max_payload = max_payload  # nats-server's (core/nats_config.py)
        self.sink = LogSink()
        if secure is None:
            secure = os.environ.get("UNIMODEL_TEST_BUS_AUTH", "1") != "0"
        self.credentials = LocalCredentials.ensure(tmp, extra_nats_users=(TEST_NATS_USER,)) if secure else None
        self.nats = self._nats(free_port())
        self.etcd = EtcdServer(free_port(), free_port(), tmp, sink=self.sink)

    def _nats(self, port: int) -> NatsServer:
        if self.credentials is None:
            return NatsServer(port, self.tmp / "nats", sink=self.sink, max_payload=self.max_payload)
        config = self.credentials.write_nats_config({TEST_NATS_USER: ALL}, max_payload=self.max_payload)
        user = (TEST_NATS_USER, self.credentials.nats_password_file(TEST_NATS_USER).read_text().strip())
        return NatsServer(port, self.tmp / "nats", config_file=config, url_user=user, sink=self.sink)

    def _secure_etcd(self) -> None:
        creds = self.credentials
        if creds is not None:
            self.etcd.enable_auth(creds.etcd_root_password, ETCD_USER, creds.etcd_password, ETCD_PREFIX, creds.etcdctl_env())

    @property
    def etcd_auth(self) -> EtcdAuth:
        """The services' etcd user (anonymous when not secure)."""
        return self.credentials.etcd_auth() if self.credentials is not None else EtcdAuth()

    def etcd_env(self) -> dict[str, str]:
        """UNIMODEL_ETCD_USER and UNIMODEL_ETCD_PASSWORD_FILE of the services' etcd user (none when not secure)."""
        env = self.service_env("router")
        return {k: v for k, v in env.items() if k.startswith("UNIMODEL_ETCD_")}

    def etcd_settings(self) -> dict[str, str]:
        """The same as settings fields (etcd_user, etcd_password_file)."""
        return {k.removeprefix("UNIMODEL_").lower(): v for k, v in self.etcd_env().items()}

    def service_env(self, kind: str) -> dict[str, str]:
        """A service's UNIMODEL_* credential variables (none when not secure)."""
        return self.credentials.service_env(kind) if self.credentials is not None else {}

    def store(self) -> EtcdStore:
        """A store client as the services' etcd user."""
        return EtcdStore([("127.0.0.1", self.etcd.port)], auth=self.etcd_auth)

    def start(self) -> None:
        self.nats.start_and_wait()
        self.etcd.start_and_wait()
        self._secure_etcd()

    def restart_nats(self, down_s: float = 1.0) -> None:
        self.nats.stop()
        time.sleep(down_s)
        self.nats = self._nats(self.nats.port)
        self.nats.start_and_wait()

    def stop_etcd(self) -> None:
        self.etcd.stop()

    def start_etcd(self) -> None:
        self.etcd = EtcdServer(self.etcd.port, self.etcd.peer_port, self.tmp, sink=self.sink)
        self.etcd.start_and_wait()
        self._secure_etcd()

    def etcdctl(self, *args: str) -> str:
        return self.etcd.etcdctl(*args).stdout

    def stop(self) -> None:
        self.etcd.stop()
        self.nats.stop()


class Services:
    """Services started against one Infra; `stop()` ends every one of them."""

    def __init__(self, infra: Infra, lease_ttl_s: int = 3) -> None:
        self.infra = infra
        self.lease_ttl_s = lease_ttl_s
        self.procs: list[ManagedProcess] = []
        self.http_port = 0
        self.grpc_port = 0

    def start(self, kind: str, *args: str, name: str | None = None) -> ManagedProcess:
        argv = [
            sys.executable, "-m", MODULES[kind],
            "--nats-url", self.infra.nats.address,
            "--etcd-endpoints", self.infra.etcd.endpoint,
            "--lease-ttl-s", str(self.lease_ttl_s),
            *args,
        ]
        env = {**_env(), **self.infra.service_env(kind), "PYTHONUNBUFFERED": "1"}
        proc = ManagedProcess(name or kind, argv, sink=self.infra.sink, env=env)
        proc.start()
        self.procs.append(proc)
        return proc

    def start_named(self, *names: str, args: tuple[str, ...] = ()) -> dict[str, ManagedProcess]:
        """One service per name, its kind the name's part before the last dash ("router-1": a router,
        "worker-0": a gpu-worker), the name its instance id; `args` go to each."""
        procs = {}
        for name in names:
            kind = name.rsplit("-", 1)[0]
            procs[name] = self.start("gpu-worker" if kind == "worker" else kind, "--instance-id", name, *args, name=name)
        return procs

    def start_cluster(
        self,
        workers: int = 1,
        *,
        all_six: bool = True,
        repository: Path | None = None,
        models: str = "",
        worker_args: tuple[str, ...] = (),
    ) -> list[ManagedProcess]:
        """router, batcher, [cache, embedding-worker], N gpu-workers, gateway; waits until ready, and
        with `repository` + `models` (names or 'all') until those models are READY."""
        self.start("router")
        self.start("batcher")
        if all_six:
            self.start("cache", "--data-dir", str(self.infra.tmp / "cache"))
            self.start("embedding-worker")
        worker_procs = [
            self.start("gpu-worker", "--instance-id", f"worker-{i}", *worker_args, name=f"worker-{i}")
            for i in range(workers)
        ]
        self.http_port, self.grpc_port = free_port(), free_port()
        gw_args = ["--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port)]
        if repository is not None:
            gw_args += ["--model-repository", str(repository), "--load-models", models]
        gw = self.start("gateway", *gw_args)
        wait_until(lambda: http_ok(f"{self.url}/health/ready"), 60, "gateway ready", gw)
        if repository is not None and models:
            names = [p.name for p in repository.iterdir() if (p / "config.yaml").is_file()] if models == "all" else models.split(",")
            self.wait_models(names)
        return worker_procs

    def start_gateway(self, *args: str, name: str = "gateway", timeout: float = 60) -> ManagedProcess:
        """A gateway on free HTTP and gRPC ports (they become `http_port`/`grpc_port`), once ready."""
        self.http_port, self.grpc_port = free_port(), free_port()
        gw = self.start("gateway", "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port), *args, name=name)
        wait_until(lambda: http_ok(f"{self.url}/health/ready"), timeout, f"{name} ready", gw)
        return gw

    def wait_models(self, names: list[str], timeout: float = 90, instances: int = 1) -> None:
        """Until each model is READY on at least `instances` workers."""

        def ready() -> bool:
            for name in names:
                r = httpx.get(f"{self.url}/v1/models/{name}/status", timeout=5)
                if r.status_code != 200 or sum(i["state"] == "READY" for i in r.json()["instances"]) < instances:
                    return False
            return True

        wait_until(ready, timeout, f"models {', '.join(names)} ready")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def predict(self, value: object, model: str = "echo", timeout: float = 10) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/models/{model}:predict", json={"input": value}, timeout=timeout)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(20)


@contextmanager
def one_worker_cluster(tmp: Path, repository: Path, models: list[str]) -> Iterator[tuple[Services, int]]:
    """nats-server, etcd, router, batcher, ONE gpu-worker (its /metrics on a free port) and a gateway that
    loads `models` from `repository`; yields (the services, the worker's metrics port) once they are READY."""
    infra = Infra(tmp)
    services = Services(infra)
    try:
        infra.start()
        metrics = free_port()
        services.start("router")
        services.start("batcher")
        services.start("gpu-worker", "--instance-id", "worker-0", "--metrics-port", str(metrics), name="worker-0")
        services.start_gateway("--model-repository", str(repository), "--load-models", ",".join(models))
        services.wait_models(models)
        yield services, metrics
    finally:
        services.stop()
        infra.stop()


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("UNIMODEL_")}


def metric_total(url: str, name: str, **labels: str) -> float:
    """The sum of a counter's series at a Prometheus `url` (text format) whose labels include `labels`."""
    text = httpx.get(url, timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items())
    )


def delay_model(
    name: str, delay_ms: float, *, max_batch_size: int = 8, max_queue_delay_ms: float | None = None
) -> model_pb2.ModelConfig:
    """A model on the `delay` engine (waits delay_ms per batch without using the CPU, echoes INPUT0):
    what the integration tests load the services with."""
    body: dict[str, object] = {
        "name": name, "engine": "delay", "max_batch_size": max_batch_size,
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}],
        "options": {"delay_ms": str(delay_ms)},
    }
    if max_queue_delay_ms is not None:
        body["batching"] = {"max_queue_delay_ms": max_queue_delay_ms}
    return modelconfig.parse(body)


def register_model(infra: Infra, config: model_pb2.ModelConfig) -> None:
    """Put a model's config in etcd, as POST /v1/models does (the router places it on the workers)."""

    async def put() -> None:
        store = infra.store()
        try:
            await store.put(model_key(ETCD_PREFIX, config.name).encode(), config.SerializeToString())
        finally:
            await store.close()

    asyncio.run(put())


def etcd_instances(infra: Infra, kind: str = "") -> dict[str, registry_pb2.InstanceInfo]:
    """Instances registered in etcd right now (read with our own store client)."""

    async def read() -> dict[bytes, bytes]:
        store = infra.store()
        try:
            kvs, _rev = await store.get_prefix(instances_prefix("/unimodel/v1", kind).encode())
            return kvs
        finally:
            await store.close()

    return {k.decode(): registry_pb2.InstanceInfo.FromString(v) for k, v in asyncio.run(read()).items()}


def router_view(infra: Infra) -> set[str]:
    """Worker ids the router routes to, asked over its gRPC RouterService."""
    routers = etcd_instances(infra, "router")
    assert routers, "no router registered"
    address = next(iter(routers.values())).grpc_address
    with grpc.insecure_channel(address) as channel:
        reply = services_pb2_grpc.RouterServiceStub(channel).ListInstances(
            services_pb2.ListInstancesRequest(kind="gpu-worker"), timeout=5
        )
    return {state.info.id for state in reply.instances}


def start_cache_replicas(
    services: Services, names: list[str], *, data_dir: Path, milvus_uri: str, collection: str, store_url: str,
    password_file: Path, extra: tuple[str, ...] = (),
) -> list[int]:
    """Cache processes named `names` sharing one PostgreSQL store (`store_url`) and one Milvus collection,
    each with its metrics port (returned, in order), once every one serves its /metrics."""
    ports = []
    for name in names:
        ports.append(free_port())
        services.start(
            "cache", "--instance-id", name, "--data-dir", str(data_dir / name),
            "--milvus-uri", milvus_uri, "--milvus-collection", collection,
            "--store-url", store_url, "--store-password-file", str(password_file),
            "--metrics-port", str(ports[-1]), *extra, name=name,
        )
    procs = services.procs[-len(names):]
    for port, proc in zip(ports, procs, strict=True):
        wait_until(lambda port=port: http_ok(f"http://127.0.0.1:{port}/metrics"), 60, f"{proc.name} serving", proc)
    return ports
