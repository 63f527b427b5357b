#!/usr/bin/env python3
"""What API keys cost: the batching benchmark's request (mlp, one row) at concurrency 16 against two local
clusters side by side in one run, keys off (no keys configured) and keys on (a tenant key with a per-key
request limit, so the key check and the rate limiter both run, and an admin key), measured in
alternation so the noisy machine drifts the same way for both.

    scripts/bench/setup_peers.sh          # once: perf_analyzer in .venv-peers
    .venv/bin/python scripts/bench/auth.py [--rounds 4] [--interval-ms 3000] [--concurrency 16]
        [--json docs/benchmarks/auth.json]

HTTP: Triton's perf_analyzer (KServe v2), with `-H Authorization:Bearer <key>` on the keyed cluster. gRPC:
perf_analyzer 2.51 sends no headers over gRPC (`-H` is "ignored for GRPC requests"), so both clusters are
driven by the same client instead: tritonclient's asyncio gRPC client, `concurrency` requests in flight,
the key in the call's `authorization` metadata on the keyed cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import perf  # noqa: E402  (after the sys.path lines that make it importable)
import side_by_side as sbs  # noqa: E402  (after the sys.path lines that make it importable)

TENANT_KEY = "sk-bench-tenant"
ADMIN_KEY = "sk-bench-admin"
KEYED_ENV = {
    "UNIMODEL_API_KEYS": json.dumps({TENANT_KEY: {"tenant": "bench", "requests_per_minute": 10_000_000}}),
    "UNIMODEL_ADMIN_API_KEYS": json.dumps({ADMIN_KEY: "ops"}),
}


async def grpc_load(port: int, model: str, headers: dict[str, str], concurrency: int, seconds: float) -> dict[str, object]:
    """`concurrency` callers sending one-row KServe gRPC requests for `seconds`: throughput and latencies."""
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    data = np.random.default_rng(0).random((1, 384), dtype=np.float32)
    latencies: list[float] = []
    errors = 0
    stop_at = 0.0

    async def caller() -> None:
        nonlocal errors
        inp = grpcclient.InferInput("INPUT0", [1, 384], "FP32")
        inp.set_data_from_numpy(data)
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                await client.infer(model, [inp], headers=headers)
            except Exception:  # counted and reported: a benchmark keeps going
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)

    try:
        stop_at = time.perf_counter() + 1.0  # warm-up
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        latencies.clear()
        started = time.perf_counter()
        stop_at = started + seconds
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    finally:
        await client.close()
    latencies.sort()

    def pick(q: float) -> int:
        return int(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e6) if latencies else 0

    return {"throughput": round(len(latencies) / wall, 1), "p50_us": pick(0.5), "p99_us": pick(0.99), "errors": errors}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--interval-ms", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--model", default="mlp")
    p.add_argument(
        "--control", action="store_true",
        help="an A/A run: the second cluster has no keys either, so the ratio shows what cluster placement alone does",
    )
    p.add_argument(
        "--keyed-first", action="store_true",
        help="start the keyed cluster first (its processes then start before the other cluster's)",
    )
    p.add_argument("--json", default=str(ROOT / "docs" / "benchmarks" / "auth.json"))
    args = p.parse_args(argv)
    keyed = sbs.Mode("on") if args.control else sbs.Mode("on", env=KEYED_ENV, headers={"Authorization": f"Bearer {TENANT_KEY}"})
    modes = [keyed, sbs.Mode("off")] if args.keyed_first else [sbs.Mode("off"), keyed]
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "clusters.log", "w") as log:
        with sbs.clusters(modes, Path(tmp), args.model, log):
            import httpx

            refused = httpx.get(f"{keyed.url}/v2/models/{args.model}/ready", timeout=5).status_code
            assert refused == (200 if args.control else 401), f"the second cluster answered {refused} without a key"
            for rnd in range(args.rounds):
                row: dict[str, object] = {"round": rnd + 1}
                for protocol in ("http", "grpc"):
                    for name in sbs.alternating([m.name for m in modes], rnd):
                        mode = next(m for m in modes if m.name == name)

                        def run(mode: sbs.Mode = mode, protocol: str = protocol) -> dict[str, object]:
                            if protocol == "grpc":
                                return asyncio.run(grpc_load(
                                    mode.grpc_port, args.model, {k.lower(): v for k, v in mode.headers.items()},
                                    args.concurrency, args.interval_ms / 1000 * 2,
                                ))
                            extra = tuple(x for k, v in mode.headers.items() for x in ("-H", f"{k}:{v}"))
                            (m,) = perf.measure(
                                args.model, f"127.0.0.1:{mode.http_port}", protocol="http",
                                concurrencies=[args.concurrency], measurement_interval_ms=args.interval_ms, extra_args=extra,
                            )
                            return {k: m[k] for k in ("throughput", "p50_us", "p99_us", "stable")}

                        out = sbs.measured(mode, args.model, run)
                        row[f"{protocol}_{name}"] = out
                        print(f"round {rnd + 1} {protocol} keys {name}: {out['throughput']:.0f} infer/s p50 {out['p50_us']} "
                              f"p99 {out['p99_us']} batch rows {out['mean_batch_rows']}", flush=True)
                    row[f"{protocol}_on_vs_off"] = round(
                        row[f"{protocol}_on"]["throughput"] / row[f"{protocol}_off"]["throughput"], 3  # type: ignore[index]  # per-mode results are dicts
                    )
                rows.append(row)
    summary = {
        f"{protocol}_median_on_vs_off": statistics.median(r[f"{protocol}_on_vs_off"] for r in rows)  # type: ignore[type-var]  # ratios are floats
        for protocol in ("http", "grpc")
    }
    report = {
        "command": "scripts/bench/auth.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model, "concurrency": args.concurrency, "interval_ms": args.interval_ms,
        "control": args.control, "keyed_first": args.keyed_first,
        "rounds": rows, "summary": summary,
    }
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
