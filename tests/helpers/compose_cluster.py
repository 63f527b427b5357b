"""compose/docker-compose.yml under a real Docker engine, for tests/containers (scripts/test-containers).

The users' compose file with the override tests/containers/compose.test.yml (stand-ins for the third-party
images) or, with `ha=True`, also the users' HA override compose/docker-compose.ha.yml and its test override
tests/containers/compose.ha.test.yml (3 NATS nodes, 3 etcd members), the `cpu` profile, a project name of its
own, published ports on 127.0.0.1 at free ports, and fresh credentials (`unimodel credentials`) in a temporary
folder. `down()` removes its containers, networks and volumes.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from helpers.deploy_checks import COMPOSE_FILE, ROOT
from unimodel.local.procs import free_port, wait_until

OVERRIDE = ROOT / "tests" / "containers" / "compose.test.yml"
HA_FILE = ROOT / "compose" / "docker-compose.ha.yml"
HA_OVERRIDE = ROOT / "tests" / "containers" / "compose.ha.test.yml"
PROFILE = "cpu"
TENANT_KEY, ADMIN_KEY = "sk-containers-tenant", "sk-containers-admin"
PUBLISHED = ("HTTP", "GRPC", "JAEGER", "PROMETHEUS", "GRAFANA")


def report(line: str) -> None:
    """A figure for the run's log (pytest runs with -s): `test-containers: ...`."""
    sys.stderr.write(f"test-containers: {line}\n")


def docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: exit {result.returncode}: {result.stderr.strip()[-2000:]}")
    return result.stdout


def inspect(container: str) -> dict[str, Any]:
    return dict(json.loads(docker("inspect", container))[0])


class ComposeCluster:
    def __init__(self, secrets: Path, *, ha: bool = False) -> None:
        self.project = f"unimodel-test{'-ha' if ha else ''}-{os.getpid()}"
        # each file merged into the ones before it: the users' file(s) first, then the stand-ins
        self.files = [COMPOSE_FILE, HA_FILE, OVERRIDE, HA_OVERRIDE] if ha else [COMPOSE_FILE, OVERRIDE]
        self.command = shlex.split(os.environ.get("UNIMODEL_TEST_COMPOSE", "docker-compose"))
        self.ports = {name: free_port() for name in PUBLISHED}
        self.secrets = secrets
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("UNIMODEL_")},
            "UNIMODEL_TEST_SECRETS": str(secrets),
            "UNIMODEL_PUBLISH_HOST": "127.0.0.1",
            **{f"UNIMODEL_PUBLISH_{name}_PORT": str(port) for name, port in self.ports.items()},
            "UNIMODEL_API_KEYS": json.dumps({TENANT_KEY: "team-containers"}),
            "UNIMODEL_ADMIN_API_KEYS": json.dumps({ADMIN_KEY: "ops"}),
        }
        self.base = f"http://127.0.0.1:{self.ports['HTTP']}"
        self.grpc = f"127.0.0.1:{self.ports['GRPC']}"
        self.jaeger = f"http://127.0.0.1:{self.ports['JAEGER']}"
        self.prometheus = f"http://127.0.0.1:{self.ports['PROMETHEUS']}"

    def make_secrets(self) -> None:
        """`unimodel credentials DIR` as the compose file's header says, then readable by the containers' users."""
        subprocess.run([str(ROOT / ".venv" / "bin" / "unimodel"), "credentials", str(self.secrets)],
                       check=True, capture_output=True, timeout=60)
        for f in self.secrets.iterdir():
            f.chmod(0o644)
        self.secrets.chmod(0o755)

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        files = [arg for f in self.files for arg in ("-f", str(f))]
        cmd = [*self.command, "-p", self.project, *files, "--profile", PROFILE, *args]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env, cwd=ROOT)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def containers(self, service: str | None = None, *, all_states: bool = False) -> list[str]:
        """Container names of the project (of one service), sorted."""
        filters = ["--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            filters += ["--filter", f"label=com.docker.compose.service={service}"]
        out = docker("ps", *(["-a"] if all_states else []), *filters, "--format", "{{.Names}}")
        return sorted(out.split())

    def health(self, container: str) -> str:
        state = inspect(container)["State"]
        return str(state.get("Health", {}).get("Status") or state["Status"])

    def wait_healthy(self, services: Sequence[str], timeout_s: float) -> None:
        def all_healthy() -> bool:
            names = [c for s in services for c in self.containers(s)]
            return bool(names) and all(self.health(c) == "healthy" for c in names)

        try:
            wait_until(all_healthy, timeout_s, f"{', '.join(services)} healthy", every_s=2)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.describe()}") from None

    def describe(self) -> str:
        """Each container's state and the tail of its log: what a failed wait shows."""
        lines = []
        for c in self.containers(all_states=True):
            lines.append(f"--- {c}: {self.health(c)}")
            lines.append(docker("logs", "--tail", "15", c, check=False, timeout=30).strip()[-1500:])
        return "\n".join(lines)

    def logs(self) -> str:
        return self.compose("logs", "--no-color", timeout=120, check=False).stdout

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "--timeout", "20", timeout=300, check=False)

    def leftovers(self) -> dict[str, list[str]]:
        """What of the project is still there after down: containers, volumes, networks."""
        label = f"label=com.docker.compose.project={self.project}"
        return {
            "containers": docker("ps", "-a", "--filter", label, "--format", "{{.Names}}").split(),
            "volumes": docker("volume", "ls", "--filter", label, "--format", "{{.Name}}").split(),
            "networks": docker("network", "ls", "--filter", label, "--format", "{{.Name}}").split(),
        }

    def models_ready(self, want: dict[str, int]) -> bool:
        """Every model of `want` served by at least that many instances (GET /v1/models on the published port)."""
        data = {m["id"]: m for m in httpx.get(f"{self.base}/v1/models", headers=self.auth, timeout=10).json()["data"]}
        return all(data.get(name, {}).get("instances", 0) >= n for name, n in want.items())

    def workers_answering(self, model: str, requests: int = 60) -> set[str]:
        """The workers (x-unimodel-worker) that answered `requests` predicts of `model`, each of which must be 200."""
        workers = set()
        with httpx.Client(headers=self.auth, timeout=30) as client:
            for i in range(requests):
                r = client.post(f"{self.base}/v1/models/{model}:predict", json={"input": [float(i)]})
                assert r.status_code == 200, r.text
                workers.add(r.headers["x-unimodel-worker"])
        return workers

    def exec_python(self, container: str, code: str, timeout: float = 60) -> str:
        """Run python code in a running container (its own interpreter and network)."""
        return docker("exec", container, "python3", "-c", code, timeout=timeout)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TENANT_KEY}"}


@contextmanager
def compose_up(secrets: Path, services: Sequence[str], log: Path, *, ha: bool = False) -> Iterator[ComposeCluster]:
    """A cluster for a test module: fresh credentials, `up -d --scale gpu-worker=2`, every container of `services`
    healthy. At the end the containers' logs go to `log`, `down -v` removes the project, and no service but the
    models job and the OTLP receiver may have logged a traceback."""
    c = ComposeCluster(secrets, ha=ha)
    c.make_secrets()
    started = time.monotonic()
    try:
        c.compose("up", "-d", "--no-build", "--scale", "gpu-worker=2", timeout=900)
        c.wait_healthy(services, 600)
        report(f"compose up{' (HA)' if ha else ''} with 2 gpu-workers: every container healthy after "
               f"{time.monotonic() - started:.0f} s")
        yield c
    finally:
        logs = c.logs()
        log.write_text(logs)
        c.down()
    assert "Traceback" not in "\n".join(line for line in logs.splitlines() if not line.startswith(("models", "jaeger")))
