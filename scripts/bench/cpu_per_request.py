"""CPU per request of every process on the MLP path under perf_analyzer load, and how busy the machine is.

    .venv/bin/python scripts/bench/cpu_per_request.py [--protocol http|grpc] [--concurrency 16] [--seconds 12]
        [--py-spy PATH/TO/py-spy --profiles DIR]

Starts a local cluster as `unimodel up` runs it (nats-server, etcd, the six services, one gpu-worker) with the
`mlp` test model, runs perf_analyzer (.venv-peers, from scripts/bench/setup_peers.sh) at --concurrency over a long
window, and while it runs reads, over --seconds: each process's CPU time from /proc/PID/stat (all its threads),
the requests served from the gateway's KServe statistics (the throughput of that same window, not
perf_analyzer's figure for its own window), and the machine's idle time from /proc/stat. Prints µs of CPU per
request per process. With --py-spy, records gateway, batcher and gpu-worker (raw collapsed stacks, 250 Hz,
--nonblocking) into --profiles over the same seconds; the profiler's own cost slows the run, so take the CPU
figures from a run without it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import perf  # noqa: E402  (after the sys.path lines that make it importable)

PROFILED = ("gateway", "batcher", "worker")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_idle() -> tuple[int, int]:
    """(idle + iowait, total) jiffies since boot, all CPUs."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return values[3] + values[4], sum(values)


def served(url: str, model: str) -> int:
    stats = httpx.get(f"{url}/v2/models/{model}/stats", timeout=5).json()
    return int(stats["model_stats"][0]["inference_stats"]["success"]["count"])


def find_pids(cfg: Any) -> dict[str, int]:
    """The cluster's processes and perf_analyzer, from ps (the services by module, nats-server by its port)."""
    pids: dict[str, int] = {}
    for line in subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout.splitlines():
        pid, _, args = line.strip().partition(" ")
        for kind in ("gateway", "batcher", "worker", "router"):
            if f"-m unimodel.{kind} " in f"{args} " and (kind != "gateway" or str(cfg.http_port) in args):
                pids.setdefault(kind, int(pid))
        if "nats-server" in args and str(cfg.nats_port) in args:
            pids["nats-server"] = int(pid)
        if "bin/perf_analyzer" in args:
            pids["perf_analyzer"] = int(pid)
    return pids


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", choices=["http", "grpc"], default="http")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=12.0, help="the measured window, inside perf_analyzer's")
    p.add_argument("--py-spy", help="path of a py-spy binary: also record profiles")
    p.add_argument("--profiles", default="cpu-profiles", help="where the py-spy profiles go")
    args = p.parse_args(argv)
    from helpers.modelrepo import prepared_repository
    from unimodel.local.cluster import ClusterConfig, LocalCluster
    from unimodel.local.procs import free_port, wait_until

    repository = prepared_repository()
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "cluster.log", "w") as log:
        cfg = ClusterConfig(
            state_dir=Path(tmp) / "state", http_port=free_port(), grpc_port=free_port(), nats_port=free_port(),
            etcd_port=free_port(), log_level="warning", model_repository=repository, prepare_models=False,
            load_models="mlp",
        )
        cluster = LocalCluster(cfg, sink=log)
        try:
            cluster.start()
            url = f"http://127.0.0.1:{cfg.http_port}"
            wait_until(lambda: httpx.get(f"{url}/v1/models/mlp/status", timeout=5).json().get("state") == "READY", 120, "mlp ready")
            target = f"127.0.0.1:{cfg.grpc_port if args.protocol == 'grpc' else cfg.http_port}"
            window_ms = int((args.seconds + 14) * 1000)
            load = threading.Thread(target=lambda: perf.measure(
                "mlp", target, protocol=args.protocol, concurrencies=[args.concurrency],
                measurement_interval_ms=window_ms, max_trials=1,
            ))
            load.start()
            time.sleep(6)  # perf_analyzer started and warmed up
            pids = find_pids(cfg)
            spies = []
            if args.py_spy:
                Path(args.profiles).mkdir(parents=True, exist_ok=True)
                spies = [subprocess.Popen(
                    [args.py_spy, "record", "-p", str(pids[k]), "-d", str(int(args.seconds)), "-r", "250", "-f", "raw",
                     "--nonblocking", "-o", str(Path(args.profiles) / f"{k}-{args.protocol}.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                ) for k in PROFILED if k in pids]
            n0, idle0, cpu0, t0 = served(url, "mlp"), machine_idle(), {k: cpu_seconds(v) for k, v in pids.items()}, time.monotonic()
            time.sleep(args.seconds)
            n1, idle1, cpu1, t1 = served(url, "mlp"), machine_idle(), {k: cpu_seconds(v) for k, v in pids.items()}, time.monotonic()
            for spy in spies:
                spy.wait()
            load.join()
        finally:
            cluster.stop()
    rate = (n1 - n0) / (t1 - t0)
    idle = (idle1[0] - idle0[0]) / max(1, idle1[1] - idle0[1])
    print(f"{args.protocol} c{args.concurrency}: {rate:.0f} infer/s served over {t1 - t0:.1f} s; machine idle {100 * idle:.1f} %")
    print("| process | CPU µs per request | share of one core |")
    print("|---|---:|---:|")
    for name in sorted(pids, key=lambda k: -(cpu1[k] - cpu0[k])):
        used = cpu1[name] - cpu0[name]
        print(f"| {name} | {1e6 * used / max(1, n1 - n0):.0f} | {100 * used / (t1 - t0):.0f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
