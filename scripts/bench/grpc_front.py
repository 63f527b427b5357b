#!/usr/bin/env python3
"""The gateway's front ends side by side, interleaved in one run: gateways of different code (or settings) in
one cluster, PyTriton beside them, Triton's perf_analyzer driving each in turn (issue 19).

    .venv/bin/python scripts/bench/grpc_front.py [--variant LABEL=SERVICES_DIR[,ENV=VALUE...]]...
        [--protocols grpc,http] [--concurrency 16,1] [--rounds 3] [--interval-ms 1500]
        [--json docs/benchmarks/grpc_front.json]

One nats-server, etcd, router, batcher and gpu-worker (the MLP ONNX model, max batch 64, 1 ms max delay);
one gateway per --variant (default: one, "ours", from this tree), each started with its own PYTHONPATH
(SERVICES_DIR, e.g. a `git archive` of the old code's services/) and extra environment; PyTriton
(scripts/bench/pytriton_server.py, .venv-peers) with the same model. Every round measures each target at
each protocol and concurrency, in an order that alternates round by round (forward, then backward), so
drift in the shared machine falls on all of them alike. Reports each measurement, and per target the
median over rounds and the median of its ratio to PyTriton's measurement in the same round.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import perf  # noqa: E402  (after the sys.path lines that make it importable)


def parse_variant(text: str) -> tuple[str, str, dict[str, str]]:
    """LABEL=SERVICES_DIR[,ENV=VALUE...] -> (label, services dir or "" for this tree, env)."""
    label, _, rest = text.partition("=")
    path, *pairs = rest.split(",") if rest else [""]
    env = dict(p.split("=", 1) for p in pairs if p)
    return label, path, env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", default=[], help="LABEL=SERVICES_DIR[,ENV=VALUE...] (repeatable)")
    p.add_argument("--protocols", default="grpc,http")
    p.add_argument("--concurrency", default="16,1")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--interval-ms", type=int, default=1500)
    p.add_argument("--model", default="mlp")
    p.add_argument("--no-pytriton", action="store_true")
    p.add_argument("--json", default=str(ROOT / "docs" / "benchmarks" / "grpc_front.json"))
    args = p.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant] or [("ours", "", {})]

    from batching import start_pytriton
    from helpers.modelrepo import prepared_repository
    from helpers.support import Infra, Services, _env
    from unimodel.local.procs import ManagedProcess, free_port, http_ok, wait_until

    repository = prepared_repository()
    protocols = [x for x in args.protocols.split(",") if x]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        infra = Infra(Path(tmp))
        services = Services(infra)
        triton = None
        targets: dict[str, dict[str, str]] = {}  # label -> protocol -> host:port
        try:
            infra.start()
            services.start("router", "--log-level", "warning")
            services.start("batcher", "--log-level", "warning")
            services.start("gpu-worker", "--log-level", "warning")
            for i, (label, path, extra) in enumerate(variants):
                http_port, grpc_port = free_port(), free_port()
                env = {**_env(), **infra.service_env("gateway"), "PYTHONUNBUFFERED": "1", **extra}
                if path:
                    env["PYTHONPATH"] = path
                argv_ = [
                    sys.executable, "-m", "unimodel.gateway", "--nats-url", infra.nats.address,
                    "--etcd-endpoints", infra.etcd.endpoint, "--lease-ttl-s", "3", "--instance-id", f"gateway-{label}",
                    "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--log-level", "warning",
                    "--model-repository", str(repository), *(["--load-models", args.model] if i == 0 else []),
                ]
                gw = ManagedProcess(f"gateway-{label}", argv_, sink=infra.sink, env=env)
                gw.start()
                services.procs.append(gw)
                wait_until(functools.partial(http_ok, f"http://127.0.0.1:{http_port}/health/ready"), 60, f"{label} ready", gw)
                targets[label] = {"http": f"127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}"}
                services.http_port = http_port
            services.wait_models([args.model])
            time.sleep(1.0)
            if not args.no_pytriton:
                triton, t_http, t_grpc = start_pytriton(repository, [args.model], Path(tmp) / "pytriton.log")
                targets["pytriton"] = {"http": f"127.0.0.1:{t_http}", "grpc": f"127.0.0.1:{t_grpc}"}
            labels = list(targets)
            for rnd in range(args.rounds):
                order = labels if rnd % 2 == 0 else labels[::-1]
                for proto in protocols:
                    for c in concurrencies:
                        for label in order:
                            (m,) = perf.measure(
                                args.model, targets[label][proto], protocol=proto, concurrencies=[c],
                                measurement_interval_ms=args.interval_ms,
                            )
                            row = {"round": rnd + 1, "target": label, "protocol": proto, "concurrency": c,
                                   **{k: m[k] for k in ("throughput", "p50_us", "p99_us", "stable")}}
                            rows.append(row)
                            print(f"round {rnd + 1} {proto} c={c} {label}: {m['throughput']:.0f} infer/s "
                                  f"p50 {m['p50_us']} p99 {m['p99_us']}", flush=True)
        finally:
            if triton is not None:
                triton.terminate()
                triton.wait(30)
            services.stop()
            infra.stop()

    summary: dict[str, object] = {}
    for proto in protocols:
        for c in concurrencies:
            for label in targets:
                mine = [r for r in rows if r["target"] == label and r["protocol"] == proto and r["concurrency"] == c]
                entry: dict[str, object] = {
                    "throughput_median": statistics.median(float(r["throughput"]) for r in mine),  # type: ignore[arg-type]  # rows hold numbers here
                    "p99_us_median": statistics.median(float(r["p99_us"]) for r in mine),  # type: ignore[arg-type]  # rows hold numbers here
                }
                if "pytriton" in targets and label != "pytriton":
                    peer = {r["round"]: r for r in rows if r["target"] == "pytriton" and r["protocol"] == proto and r["concurrency"] == c}
                    entry["ratio_median"] = round(statistics.median(
                        float(r["throughput"]) / float(peer[r["round"]]["throughput"]) for r in mine  # type: ignore[arg-type]  # rows hold numbers here
                    ), 3)
                    entry["p99_ratio_median"] = round(statistics.median(
                        float(r["p99_us"]) / float(peer[r["round"]]["p99_us"]) for r in mine  # type: ignore[arg-type]  # rows hold numbers here
                    ), 3)
                summary[f"{proto} c{c} {label}"] = entry
    report = {
        "benchmark": "grpc_front",
        "command": " ".join(["python scripts/bench/grpc_front.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "client": "perf_analyzer (tritonclient 2.51.0), batch 1 per request",
        "variants": {label: {"services": path or "this tree", "env": extra} for label, path, extra in variants},
        "rows": rows,
        "summary": summary,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
