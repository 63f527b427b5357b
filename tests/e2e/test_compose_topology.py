"""The compose topology, run as local processes: compose/docker-compose.yml's six UniModel services with
their command and environment exactly as compose gives them (anchors merged, the image's UNIMODEL_* ENV
under them), only the addresses rewritten for one machine:

- compose hostnames (nats, etcd, milvus, jaeger) -> 127.0.0.1 and the port of a local nats-server, etcd,
  Milvus Lite server and OTLP receiver, started with the helpers `unimodel up` uses;
- fixed ports (gRPC, HTTP, metrics) -> free ports, one set per process (containers each have their own
  address; processes on one host do not), UNIMODEL_HOST -> 127.0.0.1;
- /models and /data/cache -> folders under tmp; the `models` job's command fills the repository (with
  `--only identity`, to stay quick).

Then the gateway must report ready, serve echo (a built-in) and `identity` (from the repository, loaded
by the gateway's UNIMODEL_LOAD_MODELS=all), a second gpu-worker is started like `--scale gpu-worker=2`
and both must get traffic (the worker's id is last in x-unimodel-path), every service answers /metrics on
the port Prometheus scrapes, and the services' spans reach the OTLP endpoint (Jaeger's place). Everything
started is stopped by PID.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from helpers.deploy_checks import DOCKERFILES, compose, dockerfile_stages, environment, unimodel_services
from helpers.otlp_receiver import OtlpReceiver
from helpers.postgres import PostgresServer
from helpers.support import Infra
from unimodel.local.cluster import SERVICES
from unimodel.local.procs import ManagedProcess, MilvusLiteServer, free_port, http_ok, wait_until

pytestmark = pytest.mark.timeout(120)

SIX = [name for name, _module in SERVICES]  # start order: the gateway last
PORT_VARS = ("UNIMODEL_GRPC_PORT", "UNIMODEL_HTTP_PORT", "UNIMODEL_METRICS_PORT")
COMPOSE_HOSTS = {"nats", "etcd", "milvus", "jaeger", "postgres"}


def _env() -> dict[str, str]:
    """This process's environment without UNIMODEL_* (a container starts with the image's and compose's only)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("UNIMODEL_")}


def image_env() -> dict[str, str]:
    """UNIMODEL_* variables the service image (deploy/Dockerfile, target `service`) sets."""
    stage = dockerfile_stages(DOCKERFILES[0])["service"]
    out: dict[str, str] = {}
    chain = []
    while stage is not None:
        chain.append(stage)
        stage = stage.parent
    for st in reversed(chain):
        for ins, args in st.instructions:
            if ins == "ENV":
                for pair in args.split():
                    key, _, value = pair.partition("=")
                    if key.startswith("UNIMODEL_"):
                        out[key] = value
    return out


@dataclass
class Topology:
    tmp: Path
    infra: Infra
    milvus: MilvusLiteServer
    receiver: OtlpReceiver
    spec: dict[str, dict[str, object]]  # compose service name -> service
    procs: list[ManagedProcess] = field(default_factory=list)
    envs: dict[str, dict[str, str]] = field(default_factory=dict)  # process name -> its environment
    postgres: PostgresServer | None = None  # the cache's scalar store (compose's `postgres`)

    @property
    def repository(self) -> Path:
        return self.tmp / "models"

    def local_env(self, name: str) -> dict[str, str]:
        """The compose service's environment with the addresses rewritten for this machine."""
        env = {**image_env(), **environment(self.spec[name])}
        rewrites = {
            "UNIMODEL_NATS_URL": self.infra.nats.address,
            "UNIMODEL_ETCD_ENDPOINTS": self.infra.etcd.endpoint,
            "UNIMODEL_MILVUS_URI": self.milvus.uri,
            "UNIMODEL_OTEL_ENDPOINT": self.receiver.endpoint,
            "UNIMODEL_STORE_URL": self.postgres.url if self.postgres else "",
            "UNIMODEL_STORE_PASSWORD_FILE": str(self.postgres.password_file) if self.postgres else "",
            "UNIMODEL_HOST": "127.0.0.1",
            "UNIMODEL_DATA_DIR": str(self.tmp / f"data-{name}"),
            "UNIMODEL_MODEL_REPOSITORY": str(self.repository),
            # no keys on loopback: the open local mode (compose requires keys; the roles are tested in
            # tests/integration/test_security_roles.py)
            "UNIMODEL_API_KEYS": "{}",
            "UNIMODEL_ADMIN_API_KEYS": "{}",
        }
        for var in env:
            if var in rewrites:
                env[var] = rewrites[var]
            elif var in PORT_VARS:
                env[var] = str(free_port())
        # the mounted secrets (/run/secrets/...) -> the local cluster's credential files, same users
        assert env.get("UNIMODEL_NATS_PASSWORD_FILE", "/run/secrets/nats-password") == "/run/secrets/nats-password", name
        command = str(self.spec[name]["command"][0])  # type: ignore[index]  # a compose service parsed from YAML
        secrets = self.infra.service_env(command)
        if command == "etcd-auth":
            secrets = {k: v for k, v in secrets.items() if k.startswith("UNIMODEL_ETCD_")}
        assert {k for k in env if k.endswith(("_USER", "_PASSWORD_FILE")) and k not in rewrites} <= set(secrets), name
        env.update(secrets)
        for var, value in env.items():
            for host in COMPOSE_HOSTS:
                assert not re.search(rf"(^|//|,){host}:\d", value), (
                    f"{name}: {var}={value} still names the compose host {host}: rewrite it in this test"
                )
        return env

    def start(self, name: str, label: str | None = None) -> ManagedProcess:
        svc = self.spec[name]
        env = self.local_env(name)
        unimodel = Path(sys.executable).parent / "unimodel"  # the image's ENTRYPOINT
        argv = [str(unimodel)] if unimodel.is_file() else [sys.executable, "-m", "unimodel.cli"]
        proc = ManagedProcess(
            label or name, [*argv, *map(str, svc["command"])],  # type: ignore[call-overload]  # svc: a compose service parsed from YAML (object)
            env={**_env(), **env, "PYTHONUNBUFFERED": "1"}, sink=self.infra.sink, color=len(self.procs),
        )
        proc.start()
        self.procs.append(proc)
        self.envs[proc.name] = env
        return proc

    def run_etcd_auth_job(self) -> None:
        """compose's etcd-auth job, against the local etcd (its authentication is on already: the job sets
        the services' password again, as on a second `docker compose up`)."""
        svc = self.spec["etcd-auth"]
        assert self.infra.credentials is not None
        root = str(self.infra.credentials.folder / "etcd-root.password")
        args = [root if a == "/run/secrets/etcd-root" else str(a) for a in svc["command"]]  # type: ignore[attr-defined]  # svc: a compose service parsed from YAML (object)
        job = ManagedProcess("etcd-auth", [sys.executable, "-m", "unimodel.cli", *args],
                             env={**_env(), **self.local_env("etcd-auth")}, sink=self.infra.sink)
        job.start()
        code = job.wait(60)
        job.stop()
        assert code == 0, " / ".join(job.lines[-5:])

    def run_models_job(self) -> None:
        svc = self.spec["models"]
        env = {k: str(self.repository) if k == "UNIMODEL_MODEL_REPOSITORY" else v for k, v in environment(svc).items()}
        argv = [sys.executable, "-m", "unimodel.cli", *map(str, svc["command"]), "--only", "identity"]  # type: ignore[call-overload]  # svc: a compose service parsed from YAML (object)
        job = ManagedProcess("models", argv, env={**_env(), **env}, sink=self.infra.sink)
        job.start()
        code = job.wait(120)
        job.stop()  # kills it if it hangs; closes its pipe
        assert code == 0, " / ".join(job.lines[-5:])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.envs['gateway']['UNIMODEL_HTTP_PORT']}"

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(20)


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[Topology]:
    spec = compose()
    ours = unimodel_services(spec)
    # the CPU profile's services; the CUDA gpu-worker needs a GPU
    chosen = {n: s for n, s in ours.items() if "gpu" not in (s.get("profiles") or [])}
    assert {str(s["command"][0]) for s in chosen.values()} == {*SIX, "models", "etcd-auth"}
    receiver = OtlpReceiver().start()
    infra = Infra(tmp_path)
    milvus = MilvusLiteServer(free_port(), tmp_path / "milvus", sink=infra.sink)
    postgres = PostgresServer()
    topo = Topology(tmp_path, infra, milvus, receiver, chosen, postgres=postgres)
    try:
        infra.start()
        milvus.start_and_wait()
        postgres.start()
        yield topo
    finally:
        topo.stop()
        postgres.stop()
        milvus.stop(10)
        infra.stop()
        receiver.stop()
        shutil.rmtree(tmp_path / "milvus", ignore_errors=True)


def worker_of(response: httpx.Response) -> str:
    path = response.headers["x-unimodel-path"].split(",")
    assert path[0].startswith("gateway-") and any(p.startswith("batcher-") for p in path), path
    assert path[-1].startswith("gpu-worker-"), path
    return path[-1]


def test_compose_services_run_as_processes_and_scale(topology: Topology) -> None:
    started = time.monotonic()
    topology.run_etcd_auth_job()
    topology.run_models_job()
    assert (topology.repository / "identity" / "config.yaml").is_file()
    for name in SIX:
        topology.start(name)
    gateway = next(p for p in topology.procs if p.name == "gateway")
    wait_until(lambda: http_ok(f"{topology.url}/health/ready"), 60, "gateway ready", gateway)
    base = topology.url

    def identity_ready(instances: int) -> bool:
        r = httpx.get(f"{base}/v1/models/identity/status", timeout=5)
        return r.status_code == 200 and sum(i["state"] == "READY" for i in r.json()["instances"]) >= instances

    wait_until(lambda: identity_ready(1), 60, "identity READY on the gpu-worker")
    with httpx.Client(base_url=base, timeout=10) as client:
        r = client.post("/v1/models/echo:predict", json={"input": {"text": "hi", "values": [1, 2, 3]}})
        assert r.status_code == 200 and r.json()["output"] == {"text": "hi", "values": [1, 2, 3]}, r.text
        first = worker_of(r)
        body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 3], "data": [1.0, 2.0, 3.0]}]}
        r = client.post("/v2/models/identity/infer", json=body)
        assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [1.0, 2.0, 3.0], r.text
        assert worker_of(r) == first

        # docker compose up --scale gpu-worker=2: one more process with the same command and environment
        topology.start("gpu-worker", label="gpu-worker-2")
        wait_until(lambda: identity_ready(2), 60, "identity READY on both gpu-workers")
        seen: set[str] = set()
        deadline = time.monotonic() + 20
        while len(seen) < 2 and time.monotonic() < deadline:
            seen.add(worker_of(client.post("/v1/models/echo:predict", json={"input": "x"})))
            r = client.post("/v2/models/identity/infer", json=body)
            assert r.status_code == 200, r.text
            seen.add(worker_of(r))
        assert len(seen) == 2, f"only {seen} answered"

    # every process serves /metrics where compose/prometheus/prometheus.yml scrapes it (its own port)
    for proc in topology.procs:
        env = topology.envs[proc.name]
        port = env["UNIMODEL_METRICS_PORT"]
        r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert r.status_code == 200 and "unimodel_service_info" in r.text, proc.name
    # tracing is on in compose (OTLP/gRPC to Jaeger): spans of the request path arrive at the endpoint
    wait_until(
        lambda: {f"unimodel-{s}" for s in ("gateway", "batcher", "router", "gpu-worker")}
        <= {s.service for s in topology.receiver.spans},
        15, "spans of gateway, batcher, router and gpu-worker",
    )
    for proc in topology.procs:
        assert proc.alive(), f"{proc.name} exited with code {proc.returncode()}"
    assert time.monotonic() - started < 90
