#!/usr/bin/env python3
"""CPU our processes spend per streamed output token, for two source trees side by side (before / after).

    .venv/bin/python scripts/bench/llm_tokens.py --trees base=/tmp/base,new=/work/main [--concurrency 1,4]
        [--rounds 2] [--requests 8] [--max-tokens 128] [--threads 1] [--json docs/benchmarks/llm_tokens_cost.json]

One local cluster per tree (nats-server, etcd, the six services, one gpu-worker; every service started with
that tree's `services/` first on its PYTHONPATH), each with SmolLM2-135M-Instruct (GGUF, the llamacpp engine,
one instance, `--threads` llama.cpp threads) registered with its cache off. Both clusters run the whole time;
the load goes to one at a time, the trees in alternating order round by round (A B, B A, ...), so the shared
machine's drift hits both alike.

The load: `--requests` streamed chat requests per run (after 2 warm-up requests) at each concurrency, each
asking for exactly `--max-tokens` tokens (`ignore_eos`, so every answer has the same length) with
`stream_options.include_usage`; output tokens are the usage chunks' completion_tokens. The client is a plain
httpx one in this process (it reads every SSE line).

Per run, from /proc: the CPU seconds of every process of the cluster, and of the gpu-worker's main thread
apart (its event loop: the worker runtime around the engine; llama.cpp decodes in the engine's own threads),
divided by the output tokens: CPU ms per output token. Figures: per tree and concurrency, pooled over the
rounds; the "per-token path" is gateway + nats-server + the gpu-worker's main thread.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import llm_cpu  # noqa: E402  # the cluster start and /proc helpers of the LLM benchmark

MODEL = llm_cpu.MODEL
PATH_PROCESSES = ("gateway", "nats-server", "gpu-worker main thread")


def register_body(repository: Path, threads: int, n_ctx: int, extra: dict[str, str]) -> dict[str, Any]:
    """POST /v1/models body: the repository's config with one instance, n_threads and the context set (options
    every tree's llamacpp engine takes), plus `extra` options."""
    from google.protobuf import json_format

    from unimodel.core import modelconfig

    config = modelconfig.load(repository / MODEL)
    data = json_format.MessageToDict(config, preserving_proto_field_name=True)
    options = {**(data.get("options") or {}), "n_threads": str(threads), **extra}
    llm = {**(data.get("llm") or {}), "context_length": n_ctx}
    return {"name": MODEL, "config": {"instance_count": 1, "options": options, "llm": llm}}


def thread_cpu_seconds(pid: int, tid: int, sys_only: bool = False) -> float:
    """utime + stime of one thread (stime only: `sys_only`), from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[12]) + (0 if sys_only else int(fields[11]))) / os.sysconf("SC_CLK_TCK")


def sys_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[12]) / os.sysconf("SC_CLK_TCK")


class Cluster:
    def __init__(self, name: str, tree: Path, threads: int, n_ctx: int, work: Path, options: dict[str, str]) -> None:
        self.name, self.tree = name, tree
        self.log = open(work / f"{name}-cluster.log", "w")  # closed in stop()
        env = {"PYTHONPATH": str(tree / "services")}
        from unimodel.local.cluster import ClusterConfig, LocalCluster
        from unimodel.local.procs import free_port

        repository = llm_cpu.our_repository()
        cfg = ClusterConfig(
            state_dir=work / f"{name}-state", http_port=free_port(), grpc_port=free_port(), nats_port=free_port(),
            etcd_port=free_port(), log_level="warning", model_repository=repository, prepare_models=False,
            load_models="", extra_env=env,
        )  # fmt: skip
        self.cluster = LocalCluster(cfg, sink=self.log)
        self.cluster.start()
        self.url = f"http://127.0.0.1:{cfg.http_port}"
        status, answer = llm_cpu.http_json(f"{self.url}/v1/models", register_body(repository, threads, n_ctx, options))
        if status >= 300:
            raise llm_cpu.BenchError(f"{name}: registering {MODEL} failed with {status}: {str(answer)[:300]}")
        llm_cpu.wait_for(
            lambda: llm_cpu.http_json(f"{self.url}/v1/models/{MODEL}/status")[1].get("state") == "READY",
            180, f"{name}: {MODEL} READY",
        )
        self.pids = {p.name: p.pid for p in self.cluster.services if p.pid}
        self.pids.update({n: p.pid for n, p in (("nats-server", self.cluster.nats), ("etcd", self.cluster.etcd)) if p})
        for service in ("gateway", "gpu-worker"):  # each runs this tree's code
            environ = Path(f"/proc/{self.pids[service]}/environ").read_bytes().split(b"\0")
            if f"PYTHONPATH={env['PYTHONPATH']}".encode() not in environ:
                raise llm_cpu.BenchError(f"{name}: the {service} does not run with {env['PYTHONPATH']} on its PYTHONPATH")

    def cpu(self) -> dict[str, float]:
        out = {name: llm_cpu.cpu_seconds(pid) for name, pid in self.pids.items()}
        worker = self.pids["gpu-worker"]
        out["gpu-worker main thread"] = thread_cpu_seconds(worker, worker)
        # of which in the kernel (system calls: sockets, epoll)
        out["gateway (sys)"] = sys_seconds(self.pids["gateway"])
        out["nats-server (sys)"] = sys_seconds(self.pids["nats-server"])
        out["gpu-worker main thread (sys)"] = thread_cpu_seconds(worker, worker, sys_only=True)
        return out

    def stop(self) -> None:
        self.cluster.stop()
        self.log.close()


async def one_request(client: httpx.AsyncClient, url: str, max_tokens: int, i: int) -> dict[str, Any]:
    body = {
        "model": MODEL, "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": f"Request {i}: tell me a long story about a lighthouse keeper."}],
        "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.8, "top_p": 0.95,
    }  # fmt: skip
    started = time.perf_counter()
    ttft = None
    events = tokens = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise llm_cpu.BenchError(f"status {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            doc = json.loads(line[6:])
            if doc.get("usage"):
                tokens = doc["usage"]["completion_tokens"]
            for choice in doc["choices"]:
                if choice["delta"].get("content"):
                    events += 1
                    if ttft is None:
                        ttft = time.perf_counter() - started
    return {"tokens": tokens, "events": events, "ttft_s": ttft or 0.0, "latency_s": time.perf_counter() - started}


async def load(url: str, concurrency: int, requests: int, max_tokens: int, offset: int) -> tuple[list[dict[str, Any]], float]:
    todo = iter(range(offset, offset + requests))
    done: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def user() -> None:
            for i in todo:
                done.append(await one_request(client, url, max_tokens, i))

        started = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
    return done, time.perf_counter() - started


def idle_rates(c: Cluster, seconds: float) -> dict[str, float]:
    """CPU seconds per second of every process while no request runs (timers, heartbeats, leases)."""
    before = c.cpu()
    time.sleep(seconds)
    after = c.cpu()
    return {k: (after[k] - before[k]) / seconds for k in before}


def measure(c: Cluster, concurrency: int, requests: int, max_tokens: int, offset: int, profile: str = "") -> dict[str, Any]:
    asyncio.run(load(c.url, concurrency, 2, max_tokens, offset))  # warm-up, not measured
    spies = []
    if profile:  # py-spy (from PATH) on the gateway and the gpu-worker while the load runs
        for service in ("gateway", "gpu-worker"):
            out = Path(profile) / f"{c.name}-c{concurrency}-{offset}-{service}.txt"
            spies.append(subprocess.Popen(
                ["py-spy", "record", "--pid", str(c.pids[service]), "--rate", "1000", "--format", "raw", "--nonblocking",
                 "--threads", "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))  # fmt: skip
        time.sleep(1)
    before = c.cpu()
    done, wall = asyncio.run(load(c.url, concurrency, requests, max_tokens, offset + 2))
    after = c.cpu()
    for spy in spies:
        spy.send_signal(signal.SIGINT)
        spy.wait(30)
    return {
        "requests": len(done), "tokens": sum(d["tokens"] for d in done), "events": sum(d["events"] for d in done),
        "wall_s": wall, "cpu_s": {k: after[k] - before[k] for k in before},
        "ttft_s": sorted(d["ttft_s"] for d in done),
    }  # fmt: skip


def pooled(runs: list[dict[str, Any]], idle: dict[str, float]) -> dict[str, Any]:
    tokens = sum(r["tokens"] for r in runs)
    wall = sum(r["wall_s"] for r in runs)
    cpu: dict[str, float] = {}
    for r in runs:
        for k, v in r["cpu_s"].items():
            cpu[k] = cpu.get(k, 0.0) + v
    per_token = {k: round(1000 * v / tokens, 3) for k, v in cpu.items()}
    # less what the process spends idle over the same time: the cost the tokens add
    marginal = {k: round(1000 * (v - idle[k] * wall) / tokens, 3) for k, v in cpu.items()}
    ttfts = sorted(t for r in runs for t in r["ttft_s"])
    return {
        "requests": sum(r["requests"] for r in runs), "output_tokens": tokens, "sse_content_events": sum(r["events"] for r in runs),
        "output_tokens_per_s": round(tokens / wall, 2) if wall else None,
        "ttft_p50_ms": round(1000 * ttfts[len(ttfts) // 2], 1) if ttfts else None,
        "cpu_ms_per_output_token": per_token,
        "per_token_path_ms": round(sum(per_token[k] for k in PATH_PROCESSES), 3),
        "idle_cpu_ms_per_s": {k: round(1000 * v, 2) for k, v in idle.items()},
        "marginal_cpu_ms_per_output_token": marginal,
        "marginal_path_ms": round(sum(marginal[k] for k in PATH_PROCESSES), 3),
        "per_round_tokens_per_s": [round(r["tokens"] / r["wall_s"], 2) for r in runs],
        "per_round_path_ms": [
            round(1000 * sum(r["cpu_s"][k] for k in PATH_PROCESSES) / r["tokens"], 3) if r["tokens"] else None for r in runs
        ],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trees", required=True, help="name=path,name=path: the source trees to compare (a path may repeat)")
    p.add_argument("--options", default="", help="name:key=value,...: model options of one tree's cluster (e.g. new4:stream_interval=4)")
    p.add_argument("--concurrency", default="1,4")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests", type=int, default=8, help="measured requests per run")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads of the model")
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--idle-s", type=float, default=30, help="seconds of idle CPU measured per cluster")
    p.add_argument("--profile", default="", help="folder: py-spy profiles of the gateway and the gpu-worker per run")
    p.add_argument("--json")
    args = p.parse_args(argv)
    trees = {name: Path(path).resolve() for name, path in (t.split("=", 1) for t in args.trees.split(","))}
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    options: dict[str, dict[str, str]] = {name: {} for name in trees}
    for spec in filter(None, args.options.split(",")):
        name, _, pair = spec.partition(":")
        key, _, value = pair.partition("=")
        options[name][key] = value
    work = Path(tempfile.mkdtemp(prefix="unimodel-llm-tokens-"))
    clusters: dict[str, Cluster] = {}
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {(t, c): [] for t in trees for c in concurrencies}
    try:
        for name, tree in trees.items():
            print(f"starting the {name} cluster ({tree}) ...", flush=True)
            clusters[name] = Cluster(name, tree, args.threads, args.n_ctx, work, options[name])
        idle: dict[str, dict[str, float]] = {}
        for name, cluster in clusters.items():
            asyncio.run(load(cluster.url, 1, 1, 8, 0))  # warm
            idle[name] = idle_rates(cluster, args.idle_s)
            print(f"{name} idle CPU ms/s: " + json.dumps({k: round(1000 * v, 2) for k, v in idle[name].items()}), flush=True)
        names = list(trees)
        offset = 0
        for r in range(args.rounds):
            for c in concurrencies:
                for name in names if r % 2 == 0 else names[::-1]:
                    run = measure(clusters[name], c, args.requests * max(1, c // 2), args.max_tokens, offset, args.profile)
                    offset += 1000
                    runs[(name, c)].append(run)
                    path = sum(run["cpu_s"][k] for k in PATH_PROCESSES)
                    print(
                        f"round {r + 1} c={c} {name}: {run['tokens'] / run['wall_s']:.1f} tok/s, {run['tokens']} tokens, "
                        f"{run['events']} content events, path {1000 * path / max(run['tokens'], 1):.3f} ms/token "
                        + " ".join(f"{k} {1000 * run['cpu_s'][k] / max(run['tokens'], 1):.3f}" for k in PATH_PROCESSES),
                        flush=True,
                    )
    finally:
        for cluster in clusters.values():
            cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    results = []
    for c in concurrencies:
        row: dict[str, Any] = {"concurrency": c}
        for name in trees:
            row[name] = pooled(runs[(name, c)], idle[name])
        results.append(row)
    report = {
        "benchmark": "llm_tokens_cost",
        "command": " ".join(["python scripts/bench/llm_tokens.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "trees": {k: str(v) for k, v in trees.items()},
        "model_options": options,
        "workload": {"max_tokens": args.max_tokens, "ignore_eos": True, "llama_threads": args.threads, "rounds": args.rounds},
        "results": results,
    }
    for row in results:
        for name in trees:
            f = row[name]
            print(
                f"c={row['concurrency']} {name}: {f['output_tokens_per_s']} tok/s, TTFT p50 {f['ttft_p50_ms']} ms, "
                f"path {f['per_token_path_ms']} ms/token (marginal {f['marginal_path_ms']}), "
                + json.dumps(f["cpu_ms_per_output_token"]) + " marginal " + json.dumps(f["marginal_cpu_ms_per_output_token"])
            )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
