#!/usr/bin/env python3
"""What one big request does to everyone else: /health/live and small :predict latency with and without a
~60 MB :predict in flight, on a local cluster (nats-server, etcd, router, batcher, one gpu-worker with the
built-in echo model, gateway; real processes, tests/helpers/support.py).

    .venv/bin/python scripts/bench/big_payloads.py [--mb 60] [--kind string|numbers] [--rounds 3]
        [--gateway-env UNIMODEL_OFFLOAD_BODY_BYTES=0] [--json out.json]

Each round has two windows, interleaved so the machine drifts the same way for both: `baseline` (nothing big
in flight; as long as the previous big window) and `big` (from sending the big request until its answer is in).
In both, one caller GETs /health/live every 10 ms and another sends small predicts ({"input": "ping"}) back to
back; the window's latencies are pooled per kind over the rounds. The big request is sent from its own process,
which makes its body and connects before the window starts (neither its upload and download nor making the body
share this process's event loop). Reported: p50 / p99 / max per window kind,
the ratios big / baseline, the big request's status and time.

`--kind string`: {"input": "<mb MB of text>"}, the shape of a document or a base64 blob; `numbers`: a JSON list
of floats (encoded ~1.24x bigger on the bus: past ~50 MB it is a 413 naming the limit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from helpers.support import Infra, Services  # noqa: E402  (after the sys.path line that makes it importable)


def big_body(mb: float, kind: str) -> bytes:
    size = int(mb * 1_000_000)
    if kind == "numbers":
        n = size // 9  # "0.123456," is 9 bytes
        return b'{"input":[' + b",".join([b"0.123456"] * n) + b"]}"
    return b'{"input":"' + b"a" * size + b'"}'


def _send_big(url: str, mb: float, kind: str, conn: Any) -> None:
    """In the sender process: build the body, say ready, wait for "go", send it, report (status, detail, s)."""
    body = big_body(mb, kind)
    with httpx.Client(timeout=300) as client:
        client.get(url.split("/v1/")[0] + "/health/live")  # connection open before the window starts
        conn.send("ready")
        conn.recv()
        t0 = time.perf_counter()
        try:
            r = client.post(url, content=body, headers={"content-type": "application/json"})
            status, detail = r.status_code, (r.text[:300] if r.status_code != 200 else f"{len(r.content)} bytes")
        except httpx.HTTPError as exc:
            status, detail = 0, repr(exc)
        conn.send((status, detail, time.perf_counter() - t0))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def probe(base: str, stop: asyncio.Event, live: list[float], small: list[float], failures: list[str]) -> None:
    """/health/live every 10 ms and small predicts back to back, until `stop`: latencies in ms."""

    async def lives(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            r = await client.get(f"{base}/health/live")
            live.append((time.perf_counter() - t0) * 1000)
            if r.status_code != 200:
                failures.append(f"live {r.status_code}")
            await asyncio.sleep(0.01)

    async def smalls(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            r = await client.post(f"{base}/v1/models/echo:predict", content=b'{"input":"ping"}')
            small.append((time.perf_counter() - t0) * 1000)
            if r.status_code != 200:
                failures.append(f"small {r.status_code} {r.text[:200]}")

    async with httpx.AsyncClient(timeout=60) as a, httpx.AsyncClient(timeout=60) as b:
        await asyncio.gather(lives(a), smalls(b))


async def window(base: str, seconds: float | None, big: tuple[float, str] | None) -> dict[str, Any]:
    """One window: the probes, and with `big` (mb, kind) one big request sent by a process of its own that
    built its body and connected before the window starts (nothing of it runs in this process's loop)."""
    proc = conn = None
    if big is not None:
        ctx = multiprocessing.get_context("spawn")
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=_send_big, args=(f"{base}/v1/models/echo:predict", *big, child))
        proc.start()
        while not conn.poll():
            await asyncio.sleep(0.02)
        conn.recv()  # ready
    live: list[float] = []
    small: list[float] = []
    failures: list[str] = []
    stop = asyncio.Event()
    task = asyncio.create_task(probe(base, stop, live, small, failures))
    await asyncio.sleep(0.3)  # probes running before the big request leaves
    live.clear()
    small.clear()
    result: dict[str, Any] = {}
    t0 = time.perf_counter()
    if proc is not None and conn is not None:
        conn.send("go")
        while not conn.poll():
            await asyncio.sleep(0.02)
        status, detail, elapsed = conn.recv()
        proc.join()
        result = {"status": status, "detail": detail, "seconds": round(elapsed, 2)}
    else:
        await asyncio.sleep(seconds or 1.0)
    result["window_s"] = time.perf_counter() - t0
    stop.set()
    await task
    return {**result, "live": live, "small": small, "failures": failures}


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values), "p50_ms": round(pct(values, 0.5), 2), "p90_ms": round(pct(values, 0.9), 2),
        "p99_ms": round(pct(values, 0.99), 2), "slowest_ms": [round(v, 1) for v in sorted(values)[-8:]],
        "max_ms": round(max(values, default=float("nan")), 2),
        "mean_ms": round(statistics.fmean(values), 2) if values else float("nan"),
    }


async def run(base: str, big: tuple[float, str], rounds: int) -> dict[str, Any]:
    pooled: dict[str, dict[str, list[float]]] = {k: {"live": [], "small": []} for k in ("baseline", "big")}
    bigs = []
    failures: list[str] = []
    last = 3.0
    for r in range(rounds):
        base_w = await window(base, last, None)
        big_w = await window(base, None, big)
        last = big_w["window_s"]
        for name, w in (("baseline", base_w), ("big", big_w)):
            pooled[name]["live"] += w["live"]
            pooled[name]["small"] += w["small"]
            failures += w["failures"]
        bigs.append({k: big_w[k] for k in ("status", "detail", "seconds")})
        print(f"round {r + 1}: big {big_w['status']} in {big_w['seconds']} s; live p99 baseline "
              f"{pct(base_w['live'], 0.99):.1f} ms, big {pct(big_w['live'], 0.99):.1f} ms; small p99 baseline "
              f"{pct(base_w['small'], 0.99):.1f} ms, big {pct(big_w['small'], 0.99):.1f} ms", flush=True)
    out: dict[str, Any] = {k: {kind: summary(v) for kind, v in w.items()} for k, w in pooled.items()}
    for kind in ("live", "small"):
        b, g = out["baseline"][kind], out["big"][kind]
        out[f"{kind}_p99_ratio"] = round(g["p99_ms"] / b["p99_ms"], 2) if b["p99_ms"] else None
    out["big_requests"] = bigs
    out["failures"] = failures[:20]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=60.0, help="size of the big body in MB (10^6 bytes)")
    parser.add_argument("--kind", choices=("string", "numbers"), default="string")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gateway-env", action="append", default=[], help="NAME=VALUE for the gateway (repeatable)")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    size = len(big_body(args.mb, args.kind))
    print(f"big body: {size} bytes ({args.kind})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        infra = Infra(Path(tmp))
        services = Services(infra)
        try:
            infra.start()
            extra = dict(e.split("=", 1) for e in args.gateway_env)
            if extra:
                env = infra.service_env
                infra.service_env = lambda kind: {**env(kind), **(extra if kind == "gateway" else {})}  # type: ignore[method-assign]  # the gateway's extra settings
            services.start_cluster(all_six=False)
            for _ in range(50):  # echo ready
                if services.predict("warm").status_code == 200:
                    break
                time.sleep(0.2)
            result = asyncio.run(run(services.url, (args.mb, args.kind), args.rounds))
        finally:
            services.stop()
            infra.stop()
    result["body_bytes"], result["kind"], result["gateway_env"] = size, args.kind, args.gateway_env
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
