"""compose/docker-compose.yml under a real Docker engine (run by scripts/test-containers, which builds the images
first): the images deploy/Dockerfile builds, the compose healthchecks, real clients on the published ports,
traces at the OTLP receiver, every service scraped by Prometheus, `--scale gpu-worker=3`, a `docker kill`ed
worker under load, and `down -v`.

The tests share one cluster and run in file order: up with 2 gpu-workers, the clients, then scale to 3, then the
kill, then down. The third-party services are stand-ins (tests/containers/compose.test.yml).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import sklearn.datasets
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from helpers.compose_cluster import ComposeCluster, compose_up, docker, inspect, report
from helpers.predict_load import PredictLoad
from unimodel.local.cluster import SERVICES
from unimodel.local.procs import wait_until

pytestmark = pytest.mark.timeout(900)

SIX = [name for name, _module in SERVICES]
IMAGE, MODELS_IMAGE = "unimodel:0.1.0", "unimodel-models:0.1.0"
CUDA_LAYER_IMAGE = "unimodel-test/cuda-python-layer:latest"
SERVICE_IMAGE_LIMIT_BYTES = 1.2e9
INFRA = ["nats", "etcd", "postgres", "milvus", "jaeger", "prometheus"]
CHAT_MODEL, EMBEDDING_MODEL, SPEECH_MODEL = "smollm2-135m-instruct", "all-minilm-l6-v2", "whisper-base"
DEMO = ["mlp", "iris-classifier", "efficientnet-lite0", "delay", CHAT_MODEL, EMBEDDING_MODEL, SPEECH_MODEL]
SPEECH_CLIP = Path(__file__).resolve().parents[1] / "data" / "speech" / "02.wav"  # "Our meeting starts at nine ..."


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeCluster]:
    with compose_up(tmp_path_factory.mktemp("secrets"), [*INFRA, *SIX], Path("/tmp/unimodel-test-containers.log")) as c:
        yield c


# images ----------------------------------------------------------------------------------------------------------
def test_the_service_image_is_non_root_slim_without_build_tools_and_answers_help() -> None:
    config = inspect(IMAGE)["Config"]
    assert config["User"] == "unimodel" and config["Entrypoint"] == ["unimodel"], config
    assert config["Healthcheck"]["Test"] == ["CMD", "unimodel", "healthcheck"], config["Healthcheck"]
    uid = docker("run", "--rm", "--entrypoint", "id", IMAGE, "-u").strip()
    assert uid == "10001", uid
    helped = docker("run", "--rm", IMAGE, "--help")
    assert "usage: unimodel <command>" in helped and "gateway" in helped
    assert "usage: unimodel gateway" in docker("run", "--rm", IMAGE, "gateway", "--help")
    tools = docker("run", "--rm", "--entrypoint", "sh", IMAGE, "-c",
                   "for t in gcc cc c++ cmake make ld; do command -v $t || true; done").split()
    assert tools == [], f"build tools in the runtime image: {tools}"
    torch = docker("run", "--rm", "--entrypoint", "python3", IMAGE, "-c",
                   "import importlib.util as u; print(u.find_spec('torch') is not None)").strip()
    assert torch == "False"
    size = int(inspect(IMAGE)["Size"])
    models_size = int(inspect(MODELS_IMAGE)["Size"])
    report(f"image {IMAGE}: {size / 1e6:.0f} MB (limit {SERVICE_IMAGE_LIMIT_BYTES / 1e6:.0f} MB); "
           f"{MODELS_IMAGE}: {models_size / 1e6:.0f} MB")
    assert size <= SERVICE_IMAGE_LIMIT_BYTES, size


def test_the_cuda_images_python_layer_builds_on_a_stand_in_base() -> None:
    """deploy/Dockerfile.cuda on a base without CUDA or vLLM (tests/containers/standins/Dockerfile.cuda-base):
    UniModel, llama.cpp and the GGUF package installed by its Python layer, non-root, the same healthcheck."""
    config = inspect(CUDA_LAYER_IMAGE)["Config"]
    assert config["User"] == "unimodel" and config["Entrypoint"] == ["unimodel"], config
    assert config["Healthcheck"]["Test"] == ["CMD", "unimodel", "healthcheck"], config["Healthcheck"]
    assert "usage: unimodel gpu-worker" in docker("run", "--rm", CUDA_LAYER_IMAGE, "gpu-worker", "--help")
    code = ("import llama_cpp, onnxruntime, unimodel; from unimodel.models import smollm2; "
            "print(smollm2.package_gguf().is_file())")
    assert docker("run", "--rm", "--entrypoint", "python3", CUDA_LAYER_IMAGE, "-c", code).strip() == "True"
    tools = docker("run", "--rm", "--entrypoint", "sh", CUDA_LAYER_IMAGE, "-c",
                   "for t in gcc cc cmake make; do command -v $t || true; done").split()
    assert tools == [], f"build tools left in the CUDA image: {tools}"


# the cluster -----------------------------------------------------------------------------------------------------
def test_compose_runs_the_images_healthcheck_and_every_service_is_healthy(cluster: ComposeCluster) -> None:
    for service in SIX:
        names = cluster.containers(service)
        assert len(names) == (2 if service == "gpu-worker" else 1), (service, names)
        for name in names:
            test = inspect(name)["Config"]["Healthcheck"]["Test"]
            assert test[:3] == ["CMD", "unimodel", "healthcheck"], (name, test)
            assert cluster.health(name) == "healthy", name
    # the one-shot jobs ran to completion
    for job in ("models", "etcd-auth"):
        (name,) = cluster.containers(job, all_states=True)
        state = inspect(name)["State"]
        assert state["Status"] == "exited" and state["ExitCode"] == 0, (job, state)
    # workers run as uid 10001 and can write their /data volume (the cache's SQLite folder, its own volume)
    (cache,) = cluster.containers("cache")
    assert docker("exec", cache, "sh", "-c", "id -u && touch /data/cache/.w && rm /data/cache/.w").strip() == "10001"


def test_real_clients_on_the_published_ports(cluster: ComposeCluster) -> None:
    wait_until(lambda: cluster.models_ready({m: 1 for m in DEMO}), 300, "the demo models served", every_s=1)
    r = httpx.get(f"{cluster.base}/v1/models", timeout=10)
    assert r.status_code == 401, r.text  # the published port asks for a key

    client = openai.OpenAI(base_url=f"{cluster.base}/v1", api_key=cluster.auth["Authorization"].split()[1])
    stream = client.chat.completions.create(
        model=CHAT_MODEL, stream=True, max_tokens=16,
        messages=[{"role": "user", "content": "Say hello in one short sentence."}],
        extra_body={"cache": False},
    )
    chunks = [c for c in stream]
    text = "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)
    assert len(chunks) > 2 and text.strip(), chunks
    emb = client.embeddings.create(model=EMBEDDING_MODEL, input=["a cat sits on the mat", "a dog runs"])
    assert [len(d.embedding) for d in emb.data] == [384, 384]
    with open(SPEECH_CLIP, "rb") as f:  # CTranslate2 and libsndfile in the service image
        speech = client.audio.transcriptions.create(model=SPEECH_MODEL, file=f)
    assert "meeting" in speech.text.lower() and "tuesday" in speech.text.lower(), speech.text

    x = np.ones((1, 384), np.float32)
    h = httpclient.InferenceServerClient(cluster.base.removeprefix("http://"))
    hin = httpclient.InferInput("INPUT0", [1, 384], "FP32")
    hin.set_data_from_numpy(x)
    via_http = h.infer("mlp", [hin], headers=cluster.auth).as_numpy("OUTPUT0")
    g = grpcclient.InferenceServerClient(cluster.grpc)
    gin = grpcclient.InferInput("INPUT0", [1, 384], "FP32")
    gin.set_data_from_numpy(x)
    via_grpc = g.infer("mlp", [gin], headers={"authorization": cluster.auth["Authorization"]}).as_numpy("OUTPUT0")
    assert via_http is not None and via_grpc is not None and np.allclose(via_http, via_grpc)
    h.close()
    g.close()

    image = base64.b64encode(Path(sklearn.datasets.__file__).parent.joinpath("images", "flower.jpg").read_bytes())
    r = httpx.post(f"{cluster.base}/v1/models/efficientnet-lite0:predict", json={"input": image.decode()},
                   headers=cluster.auth, timeout=60)
    assert r.status_code == 200 and r.json()["output"]["labels"][0]["label"] == "daisy", r.text

    # the ModelCache API on the cache service (PostgreSQL and Milvus in their own containers)
    scope = {"model": "containers-test"}
    insert = {"type": "insert", "scope": scope, "chat_info": [{"query": "What colour is the sky?", "answer": "Blue."}]}
    r = httpx.post(f"{cluster.base}/modelcache", json=insert, headers=cluster.auth, timeout=60)
    assert r.status_code == 200 and r.json()["errorCode"] == 0, r.text

    def hit() -> bool:
        q = {"type": "query", "scope": scope, "query": "What color is the sky?"}
        body = httpx.post(f"{cluster.base}/modelcache", json=q, headers=cluster.auth, timeout=60).json()
        return bool(body["cacheHit"]) and body["answer"] == "Blue."

    wait_until(hit, 30, "a semantic cache hit", every_s=1)
    r = httpx.post(f"{cluster.base}/v1/models/nope:predict", json={"input": 1}, headers=cluster.auth, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND", r.text


def test_traces_reach_the_otlp_receiver_and_prometheus_scrapes_every_service(cluster: ComposeCluster) -> None:
    # every service: the request path, and the cache through the ModelCache API calls above
    wanted = {f"unimodel-{s}" for s in SIX}

    seen: set[str] = set()

    def traced() -> set[str]:
        seen.update(httpx.get(f"{cluster.jaeger}/api/services", timeout=10).json()["data"])
        return seen if wanted <= seen else set()

    try:
        services = wait_until(traced, 60, f"spans of {sorted(wanted)} at the OTLP receiver", every_s=2)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; seen: {sorted(seen)}") from None
    traces = httpx.get(f"{cluster.jaeger}/api/traces", params={"service": "unimodel-gateway", "limit": 20}, timeout=10)
    assert traces.status_code == 200 and traces.json()["data"], traces.text

    targets: list[dict[str, object]] = []

    def scraped() -> dict[str, int]:
        targets[:] = httpx.get(f"{cluster.prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        up: dict[str, int] = {}
        for t in targets:
            if t["health"] == "up":
                job = t["labels"]["job"]  # type: ignore[index]
                up[job] = up.get(job, 0) + 1
        return up if all(up.get(s, 0) >= (2 if s == "gpu-worker" else 1) for s in SIX) else {}

    try:
        up = wait_until(scraped, 60, "Prometheus scraping every service (2 gpu-workers)", every_s=2)
    except TimeoutError as exc:
        seen = [(t["labels"], t["health"], t.get("lastError")) for t in targets]
        raise AssertionError(f"{exc}; targets: {seen}") from None
    report(f"traces from {sorted(services)}; Prometheus targets up {up}")


def worker_batches(cluster: ComposeCluster, container: str) -> float:
    text = cluster.exec_python(container, "import urllib.request as u; print(u.urlopen('http://127.0.0.1:9100/metrics').read().decode())")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("unimodel_worker_batches_total{"))


def test_scale_to_three_gpu_workers_and_the_new_one_takes_traffic(cluster: ComposeCluster) -> None:
    before = set(cluster.containers("gpu-worker"))
    cluster.compose("up", "-d", "--no-build", "--no-recreate", "--scale", "gpu-worker=3", "gpu-worker", timeout=300)
    after = set(cluster.containers("gpu-worker"))
    (new,) = after - before
    cluster.wait_healthy(["gpu-worker"], 180)
    wait_until(lambda: cluster.models_ready({"mlp": 3, "delay": 3}), 180, "mlp and delay on 3 workers", every_s=1)
    workers = cluster.workers_answering("delay")
    assert len(workers) == 3, workers
    assert worker_batches(cluster, new) > 0, f"{new} ran no batch"
    report(f"scaled to 3 gpu-workers: {new} served; workers seen {sorted(workers)}")


def kill_under_load(cluster: ComposeCluster, kill: Callable[[str], None], restart: Callable[[str], None]) -> str:
    """kill a gpu-worker while 6 clients send predicts, `restart` it, wait until it is healthy and serves again.
    Every request must be answered right (the router sends a lost batch again)."""
    victim = cluster.containers("gpu-worker")[0]
    with PredictLoad(cluster.base, "delay", clients=6, headers=cluster.auth) as load:
        time.sleep(3)
        kill(victim)
        killed = time.monotonic()
        restart(victim)
        cluster.wait_healthy(["gpu-worker"], 180)
        wait_until(lambda: cluster.models_ready({"delay": 3}), 120, "delay on 3 workers again", every_s=1)
        back_s = time.monotonic() - killed
        time.sleep(3)
    failures = load.failures()
    line = f"{victim} back healthy with its models after {back_s:.1f} s; {load.ok} answers, {len(failures)} failed"
    assert load.ok > 0 and not failures, (line, failures[:5])
    return line


def test_docker_kill_of_a_worker_under_load_loses_nothing_and_compose_brings_it_back(cluster: ComposeCluster) -> None:
    """`docker kill` is a manual stop: Docker applies no restart policy to it; `up` starts the worker again."""

    def restart(victim: str) -> None:
        wait_until(lambda: inspect(victim)["State"]["Status"] == "exited", 30, f"{victim} stopped", every_s=1)
        cluster.compose("up", "-d", "--no-build", "--no-recreate", "--scale", "gpu-worker=3", "gpu-worker", timeout=300)

    line = kill_under_load(cluster, lambda victim: docker("kill", victim), restart)
    report(f"docker kill: {line}")


def test_a_crashed_worker_under_load_is_restarted_by_its_policy_and_loses_nothing(cluster: ComposeCluster) -> None:
    """A crash (here SIGKILL to the container's process from the host, as the kernel's OOM killer does) is
    restarted by the restart policy (unless-stopped), with no one running compose."""
    if os.geteuid() != 0:
        pytest.skip("signalling a container's process from the host needs root")
    restarts: dict[str, int] = {}

    def crash(victim: str) -> None:
        restarts[victim] = int(inspect(victim)["RestartCount"])
        os.kill(int(inspect(victim)["State"]["Pid"]), signal.SIGKILL)

    def restarted(victim: str) -> None:
        wait_until(lambda: int(inspect(victim)["RestartCount"]) > restarts[victim], 60, f"{victim} restarted by Docker", every_s=1)

    line = kill_under_load(cluster, crash, restarted)
    report(f"crash (SIGKILL from the host): {line}")


def test_down_v_leaves_nothing(cluster: ComposeCluster) -> None:
    cluster.down()
    assert cluster.leftovers() == {"containers": [], "volumes": [], "networks": []}
    assert json.loads(docker("ps", "--format", "{{json .Names}}", "--filter",
                             f"label=com.docker.compose.project={cluster.project}") or "null") is None
