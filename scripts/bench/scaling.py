#!/usr/bin/env python3
"""Throughput with 1, 2 and 4 gpu-workers on the `delay` model: does the system scale with workers?

    .venv/bin/python scripts/bench/scaling.py [--workers 1,2,4] [--delay-ms 50] [--batch 4]
        [--concurrency 64] [--json docs/benchmarks/scaling.json]

The delay engine waits a fixed time per batch without using the CPU, so on a 2-core machine the
workers' own compute does not cap the figure: what is measured is how well the gateway, batcher and
router spread work over the workers. Each worker runs one batch at a time
(--max-concurrent-batches 1), so one worker's ceiling is batch / delay (4 / 50 ms = 80 infer/s) and N
workers' is N times that. For each N a fresh local cluster (nats-server, etcd, the six services, N
workers) starts on free ports; the delay model is registered with the given max_batch_size and delay;
Triton's perf_analyzer (scripts/bench/setup_peers.sh) drives KServe v2 gRPC infer at a fixed
concurrency. Target: throughput(N) >= 0.9 * N * throughput(1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import perf  # noqa: E402  (after the sys.path lines that make it importable)


def run_one(workers: int, args: argparse.Namespace, repository: Path) -> dict[str, object]:
    from unimodel.local.cluster import ClusterConfig, LocalCluster
    from unimodel.local.procs import free_port, wait_until

    with tempfile.TemporaryDirectory() as tmp:
        log = open(Path(tmp) / "cluster.log", "w")
        cfg = ClusterConfig(
            state_dir=Path(tmp) / "state", http_port=free_port(), grpc_port=free_port(), nats_port=free_port(),
            etcd_port=free_port(), workers=workers, log_level="warning", model_repository=repository,
            prepare_models=False, load_models="",
            extra_env={"UNIMODEL_MAX_CONCURRENT_BATCHES": "1"},
        )
        cluster = LocalCluster(cfg, sink=log)
        try:
            cluster.start()
            url = f"http://127.0.0.1:{cfg.http_port}"
            body = {
                "name": "delay",
                "config": {
                    "max_batch_size": args.batch,
                    "batching": {"max_queue_delay_ms": 1},
                    "options": {"delay_ms": str(args.delay_ms)},
                },
            }
            r = httpx.post(f"{url}/v1/models", json=body, timeout=10)
            r.raise_for_status()

            def ready() -> bool:
                status = httpx.get(f"{url}/v1/models/delay/status", timeout=5).json()
                return sum(i["state"] == "READY" for i in status["instances"]) >= workers

            wait_until(ready, 60, f"delay model ready on {workers} workers")
            time.sleep(1.0)  # let every router/gateway see the last worker's registration
            rows = perf.measure(
                "delay", f"127.0.0.1:{cfg.grpc_port}", protocol="grpc", concurrencies=[args.concurrency],
                shapes={"INPUT0": [16]}, measurement_interval_ms=args.interval_ms,
            )
        finally:
            cluster.stop()
            log.close()
    row = rows[-1]
    return {"workers": workers, **{k: row[k] for k in ("throughput", "p50_us", "p99_us", "stable")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--delay-ms", type=int, default=50)
    p.add_argument("--batch", type=int, default=4, help="max_batch_size of the delay model")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--interval-ms", type=int, default=5000)
    p.add_argument("--json", default=str(ROOT / "docs" / "benchmarks" / "scaling.json"))
    args = p.parse_args(argv)
    from helpers.modelrepo import prepared_repository

    repository = prepared_repository()
    counts = [int(n) for n in args.workers.split(",")]
    results = [run_one(n, args, repository) for n in counts]
    base = float(results[0]["throughput"]) / counts[0]
    for r in results:
        r["ideal"] = round(base * int(r["workers"]), 1)
        r["efficiency"] = round(float(r["throughput"]) / (base * int(r["workers"])), 3)  # type: ignore[arg-type, call-overload]  # a result row holds numbers as object (dict[str, object])
        r["ceiling"] = round(int(r["workers"]) * args.batch * 1000 / args.delay_ms, 1)
    report = {
        "benchmark": "scaling",
        "command": " ".join(["python scripts/bench/scaling.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "model": {"name": "delay", "delay_ms": args.delay_ms, "max_batch_size": args.batch},
        "client": f"perf_analyzer gRPC, concurrency {args.concurrency}, INPUT0 FP32 [1,16]",
        "results": results,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print("| workers | infer/s | ideal (N × one) | efficiency | ceiling | p50 ms | p99 ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['workers']} | {float(r['throughput']):.1f} | {r['ideal']} | {r['efficiency']:.2f} | {r['ceiling']} "
            f"| {float(r['p50_us']) / 1000:.1f} | {float(r['p99_us']) / 1000:.1f} |"
        )
    print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
