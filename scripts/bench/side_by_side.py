"""Two or more local clusters side by side in one run, differing only in their environment (tracing on/off,
API keys on/off), measured in alternating order round by round so the noise of a shared machine hits
every mode alike. Used by tracing.py and auth.py."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx


@dataclass
class Mode:
    """One cluster of the comparison."""

    name: str
    env: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    """What a client of this cluster sends (e.g. Authorization)."""
    cluster: object = None
    http_port: int = 0
    grpc_port: int = 0

    def pids(self) -> dict[str, int]:
        return {p.name: p.pid for p in self.cluster.services if p.pid}  # type: ignore[attr-defined]  # a LocalCluster once started

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def model_stats(mode: Mode, model: str) -> tuple[int, int]:
    """(inference_count, execution_count) of the model, from the gateway's KServe statistics."""
    reply = httpx.get(f"{mode.url}/v2/models/{model}/stats", headers=mode.headers, timeout=10)
    (entry,) = reply.json()["model_stats"]
    return entry["inference_count"], entry["execution_count"]


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def clusters(modes: list[Mode], folder: Path, model: str, log: IO[str]) -> Iterator[list[Mode]]:
    """Start one `unimodel up` cluster per mode (`model` from the test repository), wait until the model is
    READY in each, and stop them all on the way out."""
    from helpers.modelrepo import prepared_repository
    from unimodel.local.cluster import ClusterConfig, LocalCluster
    from unimodel.local.procs import free_port, wait_until

    repository = prepared_repository()
    started: list[LocalCluster] = []
    try:
        for mode in modes:
            mode.http_port, mode.grpc_port = free_port(), free_port()
            cfg = ClusterConfig(
                state_dir=folder / mode.name, http_port=mode.http_port, grpc_port=mode.grpc_port, nats_port=free_port(),
                etcd_port=free_port(), log_level="warning", model_repository=repository, prepare_models=False,
                load_models=model, extra_env=mode.env,
            )
            cluster = LocalCluster(cfg, sink=log)
            started.append(cluster)
            mode.cluster = cluster
            cluster.start()
            wait_until(
                lambda m=mode: httpx.get(f"{m.url}/v2/models/{model}/ready", headers=m.headers, timeout=5).status_code == 200,
                120, f"{model} ready ({mode.name})",
            )
        yield modes
    finally:
        for cluster in started:
            cluster.stop()


def measured(mode: Mode, model: str, run: Callable[[], dict[str, object]], extra_pids: dict[str, int] | None = None) -> dict[str, object]:
    """`run()`'s result with the mean batch size over it (the gateway's statistics) and each process's CPU share."""
    pids = {**mode.pids(), **(extra_pids or {})}
    stats_before = model_stats(mode, model)
    before, started = {k: cpu_s(v) for k, v in pids.items()}, time.monotonic()
    out = run()
    wall = time.monotonic() - started
    stats_after = model_stats(mode, model)
    executions = stats_after[1] - stats_before[1]
    out["mean_batch_rows"] = round((stats_after[0] - stats_before[0]) / max(1, executions), 2)
    out["cpu_share"] = {k: round((cpu_s(v) - before[k]) / wall, 3) for k, v in pids.items()}
    return out


def alternating(names: list[str], rnd: int) -> list[str]:
    """The order of the modes in round `rnd`: as given in even rounds, reversed in odd ones."""
    return list(names) if rnd % 2 == 0 else list(reversed(names))
