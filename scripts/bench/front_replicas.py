#!/usr/bin/env python3
"""Throughput of the front with replicas: 1 gateway + 1 batcher against 2 gateways + 2 batchers (issue 17).

    .venv/bin/python scripts/bench/front_replicas.py [--concurrency 256] [--rounds 2] [--workers 4]
        [--delay-ms 20] [--batch 32] [--interval-ms 5000] [--json docs/benchmarks/front_replicas.json]

The `delay` model waits a fixed time per batch without using the CPU, and enough workers run it
(--workers, 4 batches at once each: far more capacity than the front can feed), so what is measured is
the gateways and batchers. Each configuration starts a fresh set of processes on free ports (nats-server,
etcd, one router, the workers, the gateways and batchers); Triton's perf_analyzer
(scripts/bench/setup_peers.sh) drives KServe v2 gRPC infer at --concurrency in all: with two gateways,
two perf_analyzers run at once, each at half the concurrency against one gateway (what a load balancer in
front of them does). The two configurations alternate for --rounds rounds, in one run; the report gives
each round's figures and the ratio of the means. Target (issue 17): >= 1.6x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import perf  # noqa: E402  (after the sys.path lines that make it importable)


def run_one(fronts: int, args: argparse.Namespace) -> dict[str, object]:
    from helpers.support import Infra, Services, delay_model, register_model
    from unimodel.local.procs import free_port, http_ok, wait_until

    with tempfile.TemporaryDirectory() as tmp:
        infra = Infra(Path(tmp))
        services = Services(infra)
        try:
            infra.start()
            services.start("router", "--log-level", "warning")
            for i in range(fronts):
                services.start("batcher", "--instance-id", f"batcher-{i}", "--log-level", "warning", name=f"batcher-{i}")
            for i in range(args.workers):
                services.start(
                    "gpu-worker", "--instance-id", f"worker-{i}", "--max-concurrent-batches", "4", "--log-level", "warning",
                    name=f"worker-{i}",
                )
            register_model(infra, delay_model("delay", args.delay_ms, max_batch_size=args.batch, max_queue_delay_ms=1))
            grpc_ports = []
            for i in range(fronts):
                http_port, grpc_port = free_port(), free_port()
                gw = services.start(
                    "gateway", "--instance-id", f"gateway-{i}", "--http-port", str(http_port), "--grpc-port", str(grpc_port),
                    "--log-level", "warning", name=f"gateway-{i}",
                )
                wait_until(lambda p=http_port: http_ok(f"http://127.0.0.1:{p}/health/ready"), 60, "gateway ready", gw)
                grpc_ports.append(grpc_port)
                services.http_port = http_port
            services.wait_models(["delay"], instances=args.workers)
            time.sleep(1.0)  # every router/gateway sees the last registration
            rows: list[dict[str, float]] = [{} for _ in grpc_ports]

            def drive(index: int, port: int) -> None:
                rows[index] = perf.measure(
                    "delay", f"127.0.0.1:{port}", protocol="grpc", concurrencies=[args.concurrency // fronts],
                    shapes={"INPUT0": [16]}, measurement_interval_ms=args.interval_ms,
                )[-1]

            threads = [threading.Thread(target=drive, args=(i, p)) for i, p in enumerate(grpc_ports)]
            before = cpu_times()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            after = cpu_times()
        finally:
            services.stop()
            infra.stop()
    return {
        "gateways": fronts, "batchers": fronts,
        "throughput": round(sum(r["throughput"] for r in rows), 1),
        "p50_us": max(r["p50_us"] for r in rows), "p99_us": max(r["p99_us"] for r in rows),
        "stable": all(bool(r["stable"]) for r in rows),
        "machine_cpu_busy": round(1 - (after[1] - before[1]) / max(1, after[0] - before[0]), 3),
    }


def cpu_times() -> tuple[int, int]:
    """(all, idle + iowait) jiffies of the machine, from /proc/stat: how busy its cores were in between."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(fields), fields[3] + fields[4]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--delay-ms", type=int, default=20)
    p.add_argument("--batch", type=int, default=32, help="max_batch_size of the delay model")
    p.add_argument("--interval-ms", type=int, default=5000)
    p.add_argument("--json", default=str(ROOT / "docs" / "benchmarks" / "front_replicas.json"))
    args = p.parse_args(argv)
    results = []
    for r in range(args.rounds):
        for fronts in (1, 2):
            row = {"round": r + 1, **run_one(fronts, args)}
            print(json.dumps(row), flush=True)
            results.append(row)

    def mean(fronts: int) -> float:
        values = [float(str(x["throughput"])) for x in results if x["gateways"] == fronts]
        return sum(values) / len(values)

    ratio = mean(2) / mean(1)
    print(f"2 gateways + 2 batchers / 1 + 1: {ratio:.2f}x (target 1.6x)")
    report = {
        "command": "python scripts/bench/front_replicas.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "settings": vars(args), "results": results, "ratio_2_over_1": round(ratio, 2),
    }
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
