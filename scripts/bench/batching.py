#!/usr/bin/env python3
"""Dynamic batching side by side: UniModel vs NVIDIA PyTriton (tritonserver + DynamicBatcher) vs raw
onnxruntime, with Triton's perf_analyzer as the client for both servers.

    scripts/bench/setup_peers.sh                       # once: perf_analyzer + PyTriton in .venv-peers
    .venv/bin/python scripts/bench/batching.py [--protocol http|grpc] [--concurrency 1,4,16,64]
        [--models mlp,all-minilm-l6-v2] [--json docs/benchmarks/batching.json]

One run, one machine, interleaved: for each model and concurrency, perf_analyzer measures UniModel's
gateway, then PyTriton (the same model files, tensor names, max_batch_size and max queue delay, an
onnxruntime session inside PyTriton's @batch function). Single-item requests (batch 1 per request).
UniModel runs as `unimodel up` would (nats-server, etcd, the six services, one gpu-worker). Also
measured: raw in-process onnxruntime at batch 1, 8 and 32 (scripts/bench/raw_onnxruntime.py), and UniModel
with batching off (the same MLP registered with max_batch_size 1) at concurrency 16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import perf  # noqa: E402  (after the sys.path lines that make it importable)


def start_pytriton(repository: Path, models: list[str], log: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    from unimodel.local.procs import free_port

    http_port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            str(perf.PEERS_VENV / "bin" / "python"), str(ROOT / "scripts" / "bench" / "pytriton_server.py"),
            "--repository", str(repository), "--models", ",".join(models),
            "--http-port", str(http_port), "--grpc-port", str(grpc_port),
        ],
        stdout=subprocess.PIPE, stderr=open(log, "w"),
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise RuntimeError(f"PyTriton exited with {proc.returncode}: {log.read_text()[-2000:]}")
        if line.startswith(b"ready"):
            return proc, http_port, grpc_port
    proc.terminate()
    raise RuntimeError("PyTriton did not become ready in 180 s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", choices=["grpc", "http"], default="http", help="perf_analyzer's -i (its default: http)")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--models", default="mlp,all-minilm-l6-v2")
    p.add_argument("--interval-ms", type=int, default=4000)
    p.add_argument("--seq-len", type=int, default=32, help="MiniLM tokens per request (2 cores: 128 takes minutes)")
    p.add_argument("--json", help="default: docs/benchmarks/batching.json (http), batching-grpc.json (grpc)")
    args = p.parse_args(argv)
    if not args.json:
        args.json = str(ROOT / "docs" / "benchmarks" / ("batching.json" if args.protocol == "http" else "batching-grpc.json"))
    from helpers.modelrepo import prepared_repository
    from unimodel.local.cluster import ClusterConfig, LocalCluster
    from unimodel.local.procs import free_port, wait_until

    repository = prepared_repository()
    models = [m for m in args.models.split(",") if m]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    results: dict[str, list[dict[str, object]]] = {m: [] for m in models}

    with tempfile.TemporaryDirectory() as tmp:
        raw_json = Path(tmp) / "raw.json"
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "bench" / "raw_onnxruntime.py"), "--repository", str(repository),
             "--models", ",".join(models), "--seq-len", str(args.seq_len), "--json", str(raw_json)],
            check=True,
        )
        raw_report = json.loads(raw_json.read_text())

    with tempfile.TemporaryDirectory() as tmp:
        log = open(Path(tmp) / "cluster.log", "w")
        cfg = ClusterConfig(
            state_dir=Path(tmp) / "state", http_port=free_port(), grpc_port=free_port(), nats_port=free_port(),
            etcd_port=free_port(), log_level="warning", model_repository=repository, prepare_models=False,
            load_models=",".join(models),
        )
        cluster = LocalCluster(cfg, sink=log)
        triton = None
        try:
            cluster.start()
            url = f"http://127.0.0.1:{cfg.http_port}"
            r = httpx.post(
                f"{url}/v1/models", json={"name": "mlp-nobatch", "path": "mlp", "config": {"max_batch_size": 1}}, timeout=10
            )
            r.raise_for_status()

            def ready() -> bool:
                for m in [*models, "mlp-nobatch"]:
                    if httpx.get(f"{url}/v1/models/{m}/status", timeout=5).json().get("state") != "READY":
                        return False
                return True

            wait_until(ready, 120, "models ready")
            triton, t_http, t_grpc = start_pytriton(repository, models, Path(tmp) / "pytriton.log")
            ours_url = f"127.0.0.1:{cfg.grpc_port if args.protocol == 'grpc' else cfg.http_port}"
            peer_url = f"127.0.0.1:{t_grpc if args.protocol == 'grpc' else t_http}"
            for model in models:
                for c in concurrencies:
                    row: dict[str, object] = {"concurrency": c}
                    for who, target in (("unimodel", ours_url), ("pytriton", peer_url)):
                        (m,) = perf.measure(
                            model, target, protocol=args.protocol, concurrencies=[c],
                            measurement_interval_ms=args.interval_ms, seq_len=args.seq_len,
                        )
                        row[who] = {k: m[k] for k in ("throughput", "p50_us", "p99_us", "stable")}
                        print(f"{model} c={c} {who}: {m['throughput']:.0f} infer/s p50 {m['p50_us']} p99 {m['p99_us']}",
                              flush=True)
                    row["throughput_ratio"] = round(row["unimodel"]["throughput"] / row["pytriton"]["throughput"], 2)  # type: ignore[index]  # row's per-server results are dicts (row: dict[str, object])
                    row["p99_ratio"] = round(row["unimodel"]["p99_us"] / row["pytriton"]["p99_us"], 2)  # type: ignore[index]  # row's per-server results are dicts (row: dict[str, object])
                    results[model].append(row)
            (off,) = perf.measure(
                "mlp-nobatch", ours_url, protocol=args.protocol, concurrencies=[16], measurement_interval_ms=args.interval_ms
            )
        finally:
            if triton is not None:
                triton.terminate()
                try:
                    triton.wait(30)
                except subprocess.TimeoutExpired:
                    triton.kill()
            cluster.stop()
            log.close()

    summary: dict[str, object] = {}
    for model in models:
        raw32 = next(r for r in raw_report["models"][model] if r["batch"] == 32)["items_per_s"]
        c16 = next((r for r in results[model] if r["concurrency"] == 16), None)
        if c16 is not None:
            summary[model] = {
                "c16_throughput_vs_pytriton": c16["throughput_ratio"],
                "c16_p99_vs_pytriton": c16["p99_ratio"],
                "c16_throughput_vs_raw_batch32": round(c16["unimodel"]["throughput"] / raw32, 3),  # type: ignore[index]  # row's per-server results are dicts (row: dict[str, object])
            }
    on16 = next((r for r in results.get("mlp", []) if r["concurrency"] == 16), None)
    if on16 is not None:
        summary["mlp_batching_on_vs_off_c16"] = round(on16["unimodel"]["throughput"] / off["throughput"], 2)  # type: ignore[index]  # row's per-server results are dicts (row: dict[str, object])
    report = {
        "benchmark": "batching",
        "command": " ".join(["python scripts/bench/batching.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "client": f"perf_analyzer (tritonclient 2.51.0), {args.protocol}, batch 1 per request",
        "results": results,
        "batching_off": {"model": "mlp (max_batch_size 1)", "concurrency": 16,
                         **{k: off[k] for k in ("throughput", "p50_us", "p99_us", "stable")}},
        "raw_onnxruntime": raw_report["models"],
        "summary": summary,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    for model in models:
        print(f"\n{model}\n| c | ours infer/s | PyTriton infer/s | ratio | ours p50/p99 ms | PyTriton p50/p99 ms |")
        print("|---:|---:|---:|---:|---:|---:|")
        for r in results[model]:
            o, t = r["unimodel"], r["pytriton"]
            print(
                f"| {r['concurrency']} | {o['throughput']:.0f} | {t['throughput']:.0f} | {r['throughput_ratio']}× | "  # type: ignore[index]  # row's per-server results are dicts (row: dict[str, object])
                f"{o['p50_us'] / 1000:.2f} / {o['p99_us'] / 1000:.2f} | {t['p50_us'] / 1000:.2f} / {t['p99_us'] / 1000:.2f} |"
            )
    print("\nsummary:", json.dumps(summary, indent=2))
    print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
