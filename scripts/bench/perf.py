#!/usr/bin/env python3
"""Triton's perf_analyzer as a small library: run it at given concurrencies, parse its CSV report.

perf_analyzer is the binary inside the tritonclient 2.51.0 wheel in the peer venv (.venv-peers, made by
scripts/bench/setup_peers.sh). This module only needs the standard library, so UniModel's own venv can import
it; it runs the binary as a subprocess with LD_LIBRARY_PATH pointing at the pip CUDA runtime it links against.

    from perf import measure
    rows = measure("mlp", "127.0.0.1:8000", protocol="http", concurrencies=[1, 4, 16, 64])
    # -> [{"concurrency": 1, "throughput": 812.3, "p50_us": 1190, "p99_us": 2410, ...}, ...]

    .venv/bin/python scripts/bench/perf.py --model mlp --url 127.0.0.1:8001 -i grpc --concurrency 1,16 [--json F]
        [--model-version 1] [extra perf_analyzer options, passed through]

Each concurrency is one perf_analyzer run (`--concurrency-range C:C`, sync mode: C client threads, each with
one request in flight, batch 1), so one unstable point does not lose the others. On a shared 2-core machine
the stability rule is relaxed (3 windows within --stability %, up to --max-trials windows); when a point still
does not settle, it is measured once more with a fixed request count and reported with "stable": false.
For MiniLM (inputs input_ids/attention_mask) the requests carry --shape NAME:SEQ and real-ish data: token ids
within the 30522-entry vocabulary ([CLS] ... [SEP]) and an all-ones mask, written to a JSON --input-data file.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PEERS_VENV = Path(os.environ.get("UNIMODEL_PEERS_VENV", ROOT / ".venv-peers"))
MINILM_VOCAB = 30522
MINILM_INPUTS = ("input_ids", "attention_mask")


class PerfError(RuntimeError):
    """perf_analyzer failed; the message carries the tail of its output."""


# --- environment ----------------------------------------------------------------------------------------
def perf_analyzer_path(venv: Path = PEERS_VENV) -> Path:
    path = venv / "bin" / "perf_analyzer"
    if not path.exists():
        raise PerfError(f"{path} not found; run scripts/bench/setup_peers.sh")
    return path


def perf_env(venv: Path = PEERS_VENV) -> dict[str, str]:
    """The environment perf_analyzer runs in: libcudart.so.12 (pip nvidia-cuda-runtime-cu12) on the library path."""
    libs = sorted(glob.glob(str(venv / "lib" / "python3*" / "site-packages" / "nvidia" / "cuda_runtime" / "lib")))
    if not libs:
        raise PerfError(f"no nvidia/cuda_runtime/lib in {venv}; run scripts/bench/setup_peers.sh")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join([libs[-1], *[p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]])
    return env


def run_perf_analyzer(args: list[str], *, timeout_s: float = 600, venv: Path = PEERS_VENV) -> str:
    """Run `perf_analyzer ARGS`; returns its stdout+stderr, raises PerfError on a non-zero exit."""
    cmd = [str(perf_analyzer_path(venv)), *args]
    try:
        proc = subprocess.run(cmd, env=perf_env(venv), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise PerfError(f"perf_analyzer timed out after {timeout_s:.0f} s: {' '.join(cmd)}") from exc
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-8:])
        raise PerfError(f"perf_analyzer exited {proc.returncode}: {' '.join(cmd)}\n{tail}")
    return output


# --- input data -----------------------------------------------------------------------------------------
def minilm_input_data(folder: Path, seq_len: int = 128, streams: int = 16, seed: int = 0) -> Path:
    """A perf_analyzer --input-data JSON file with `streams` different batch-1 MiniLM requests."""
    rng = random.Random(seed)
    data = []
    for _ in range(streams):
        ids = [101] + [rng.randrange(1996, MINILM_VOCAB) for _ in range(seq_len - 2)] + [102]  # [CLS] words [SEP]
        data.append(
            {
                "input_ids": {"content": ids, "shape": [seq_len]},
                "attention_mask": {"content": [1] * seq_len, "shape": [seq_len]},
            }
        )
    path = folder / f"minilm-{seq_len}.json"
    path.write_text(json.dumps({"data": data}))
    return path


def is_minilm(model: str) -> bool:
    return "minilm" in model.lower()


# --- CSV report -----------------------------------------------------------------------------------------
def parse_csv(text: str) -> list[dict[str, float]]:
    """Rows of perf_analyzer's -f report (latencies in µs) as {concurrency, throughput, p50_us, p90_us, ...}."""

    def number(row: dict[str, str], key: str) -> float:
        value = (row.get(key) or "").strip()
        return float(value) if value else float("nan")

    rows = []
    for row in csv.DictReader(line for line in text.splitlines() if line.strip()):
        if not row.get("Concurrency"):
            continue

        def num(key: str, row: dict[str, str] = row) -> float:
            return number(row, key)

        rows.append(
            {
                "concurrency": int(num("Concurrency")),
                "throughput": num("Inferences/Second"),
                "p50_us": num("p50 latency"),
                "p90_us": num("p90 latency"),
                "p95_us": num("p95 latency"),
                "p99_us": num("p99 latency"),
                "server_queue_us": num("Server Queue"),
                "server_compute_us": num("Server Compute Input")
                + num("Server Compute Infer")
                + num("Server Compute Output"),
            }
        )
    return rows


# --- measurement ----------------------------------------------------------------------------------------
def build_args(
    model: str,
    url: str,
    protocol: str,
    concurrency: int,
    report: Path,
    *,
    measurement_interval_ms: int,
    stability_percentage: float,
    max_trials: int,
    shapes: dict[str, list[int]] | None = None,
    input_data: Path | None = None,
    request_count: int = 0,
    model_version: str | None = None,
    extra_args: tuple[str, ...] = (),
) -> list[str]:
    if protocol not in ("http", "grpc"):
        raise ValueError(f"protocol must be http or grpc, not {protocol!r}")
    args = [
        "-m", model,
        "-u", url,
        "-i", protocol,
        "-b", "1",
        "--concurrency-range", f"{concurrency}:{concurrency}",
        "-f", str(report),
    ]  # fmt: skip
    if model_version:
        args += ["-x", model_version]
    if request_count:
        args += ["--request-count", str(request_count)]
    else:
        args += [
            "--measurement-interval", str(measurement_interval_ms),
            "--stability-percentage", str(stability_percentage),
            "--max-trials", str(max_trials),
        ]  # fmt: skip
    for name, shape in (shapes or {}).items():
        args += ["--shape", f"{name}:{','.join(str(d) for d in shape)}"]
    if input_data is not None:
        args += ["--input-data", str(input_data)]
    return [*args, *extra_args]


def measure(
    model: str,
    url: str,
    *,
    protocol: str = "http",
    concurrencies: list[int] | tuple[int, ...] = (1, 4, 16, 64),
    measurement_interval_ms: int = 4000,
    stability_percentage: float = 25,
    max_trials: int = 8,
    seq_len: int = 128,
    shapes: dict[str, list[int]] | None = None,
    input_data: Path | None = None,
    fallback_seconds: float = 6.0,
    model_version: str | None = None,
    extra_args: tuple[str, ...] = (),
    timeout_s: float = 600,
    venv: Path = PEERS_VENV,
) -> list[dict[str, object]]:
    """perf_analyzer against `url` for `model` at each concurrency; one dict per concurrency.

    `url` is host:port of the HTTP or gRPC endpoint (per `protocol`). MiniLM models get
    `--shape input_ids:SEQ --shape attention_mask:SEQ` and in-vocabulary data unless `shapes`/`input_data` say
    otherwise. An unstable point (or a window with no completed request) is measured again over a fixed request
    count (about `fallback_seconds` at the throughput perf_analyzer saw) and flagged "stable": False.
    `model_version` adds `-x V`: perf_analyzer then uses /v2/models/M/versions/V/... and only needs a stats
    entry for (M, V); without it, it needs the server's stats for M to count the requests it sent (queue.count).
    """
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="unimodel-perf-") as tmp:
        folder = Path(tmp)
        if is_minilm(model):
            shapes = shapes if shapes is not None else {name: [seq_len] for name in MINILM_INPUTS}
            input_data = input_data if input_data is not None else minilm_input_data(folder, seq_len)
        for concurrency in concurrencies:
            report = folder / f"c{concurrency}.csv"
            common = dict(
                measurement_interval_ms=measurement_interval_ms,
                stability_percentage=stability_percentage,
                max_trials=max_trials,
                shapes=shapes,
                input_data=input_data,
                model_version=model_version,
                extra_args=extra_args,
            )
            stable = True
            try:
                output = run_perf_analyzer(
                    build_args(model, url, protocol, concurrency, report, **common), timeout_s=timeout_s, venv=venv
                )
            except PerfError as exc:
                message = str(exc).lower()
                if "stable" not in message and "no valid requests" not in message:
                    raise
                stable = False
                rate = last_throughput(str(exc)) or 200.0
                count = max(200, int(rate * fallback_seconds))
                output = run_perf_analyzer(
                    build_args(model, url, protocol, concurrency, report, request_count=count, **common),
                    timeout_s=timeout_s,
                    venv=venv,
                )
            rows = parse_csv(report.read_text()) if report.exists() else []
            if not rows:
                raise PerfError(f"perf_analyzer wrote no CSV row for concurrency {concurrency}:\n{output[-2000:]}")
            row = rows[-1]
            results.append({**row, "protocol": protocol, "model": model, "stable": stable})
    return results


def last_throughput(output: str) -> float | None:
    """The last 'Throughput: N infer/sec' that perf_analyzer printed (its per-window log), if any."""
    value = None
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("Throughput:") and "infer/sec" in line:
            try:
                value = float(line.split()[1])
            except (IndexError, ValueError):
                pass
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="perf_analyzer at several concurrencies; prints JSON rows")
    parser.add_argument("--model", required=True)
    parser.add_argument("--url", required=True, help="host:port of the HTTP or gRPC endpoint")
    parser.add_argument("-i", "--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--concurrency", default="1,4,16,64", help="comma list")
    parser.add_argument("--measurement-interval", type=int, default=4000, help="ms per window")
    parser.add_argument("--stability", type=float, default=25, help="stability percentage")
    parser.add_argument("--max-trials", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128, help="MiniLM sequence length")
    parser.add_argument("--model-version", help="pass -x VERSION to perf_analyzer")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args, extra = parser.parse_known_args(argv)
    rows = measure(
        args.model,
        args.url,
        protocol=args.protocol,
        concurrencies=[int(c) for c in args.concurrency.split(",") if c.strip()],
        measurement_interval_ms=args.measurement_interval,
        stability_percentage=args.stability,
        max_trials=args.max_trials,
        seq_len=args.seq_len,
        model_version=args.model_version,
        extra_args=tuple(extra),
    )
    for row in rows:
        print(
            f"{row['model']} {row['protocol']} c={row['concurrency']:<3} {row['throughput']:9.1f} infer/s  "
            f"p50 {row['p50_us']:8.0f} µs  p99 {row['p99_us']:8.0f} µs{'' if row['stable'] else '  (unstable)'}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
