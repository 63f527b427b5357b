#!/usr/bin/env python3
"""Raw in-process onnxruntime on UniModel's model files: the floor any server is measured against.

    .venv/bin/python scripts/bench/raw_onnxruntime.py --repository DIR [--models mlp,all-minilm-l6-v2]
        [--batch-sizes 1,8,32] [--seconds 3] [--seq-len 128] [--json FILE]

For each model (default: those of mlp and all-minilm-l6-v2 present in DIR) it opens one InferenceSession on
<DIR>/<model>/model.onnx (or `file` from config.yaml) with the options UniModel's worker uses on a CPU
machine: default SessionOptions (onnxruntime's default thread pools) and the CPU provider. Then, per batch
size, it warms up for a short while and calls session.run back to back for --seconds, timing each call.
Reports per batch size: items/s (batch * calls / elapsed), calls/s, and p50/p99 of the per-call latency
in µs, as JSON on stdout (and in --json). Inputs follow config.yaml: FP32 tensors are standard normal;
input_ids are in-vocabulary token ids ([CLS] ... [SEP]); attention_mask and other integer inputs are ones.
Dims of -1 become --seq-len. Runs in .venv or .venv-peers (needs numpy, onnxruntime, PyYAML).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import yaml

DEFAULT_MODELS = ("mlp", "all-minilm-l6-v2")
NUMPY_TYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
VOCAB = 30522
MIN_CALLS = 10  # per batch size, even past --seconds (slow models at batch 32)


def make_inputs(config: dict, batch: int, seq_len: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feed = {}
    for spec in config.get("inputs") or []:
        name, datatype = spec["name"], spec["datatype"]
        if datatype not in NUMPY_TYPES:
            raise SystemExit(f"raw_onnxruntime: input {name}: datatype {datatype} not supported here")
        dims = [seq_len if int(d) < 0 else int(d) for d in spec.get("dims") or []]
        shape = [batch, *dims] if int(config.get("max_batch_size") or 0) > 0 else dims
        dtype = NUMPY_TYPES[datatype]
        if np.issubdtype(dtype, np.floating):
            feed[name] = rng.standard_normal(shape).astype(dtype)
        elif name == "input_ids":
            ids = rng.integers(1996, VOCAB, size=shape, dtype=np.int64)
            ids[..., 0], ids[..., -1] = 101, 102
            feed[name] = ids.astype(dtype)
        else:
            feed[name] = np.ones(shape, dtype=dtype)
    return feed


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    k = max(0, min(len(sorted_values) - 1, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def bench(session: ort.InferenceSession, feed: dict[str, np.ndarray], batch: int, seconds: float) -> dict:
    warm_until = time.perf_counter() + min(1.0, seconds / 3)
    while time.perf_counter() < warm_until:
        session.run(None, feed)
    latencies = []
    start = time.perf_counter()
    end = start + seconds
    now = start
    while now < end or len(latencies) < MIN_CALLS:
        t0 = time.perf_counter_ns()
        session.run(None, feed)
        latencies.append((time.perf_counter_ns() - t0) / 1000)
        now = time.perf_counter()
    elapsed = now - start
    latencies.sort()
    return {
        "batch": batch,
        "calls": len(latencies),
        "items_per_s": round(batch * len(latencies) / elapsed, 1),
        "calls_per_s": round(len(latencies) / elapsed, 1),
        "p50_us": round(percentile(latencies, 50), 1),
        "p99_us": round(percentile(latencies, 99), 1),
        "mean_us": round(statistics.fmean(latencies), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--models", default="")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per batch size")
    parser.add_argument("--seq-len", type=int, default=128, help="length for dims of -1 (MiniLM tokens)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    if args.models:
        names = [m.strip() for m in args.models.split(",") if m.strip()]
    else:
        names = [m for m in DEFAULT_MODELS if (args.repository / m / "config.yaml").is_file()]
    if not names:
        print(f"raw_onnxruntime: no model of {', '.join(DEFAULT_MODELS)} in {args.repository}", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    rng = np.random.default_rng(0)
    report: dict = {
        "onnxruntime": ort.__version__,
        "providers": ["CPUExecutionProvider"],
        "session_options": "default (onnxruntime's default intra/inter-op threads)",
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "seconds_per_point": args.seconds,
        "seq_len": args.seq_len,
        "models": {},
    }
    for name in names:
        folder = args.repository / name
        config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        path = folder / (config.get("file") or "model.onnx")
        session = ort.InferenceSession(str(path), sess_options=ort.SessionOptions(), providers=["CPUExecutionProvider"])
        rows = []
        for batch in batches:
            row = bench(session, make_inputs(config, batch, args.seq_len, rng), batch, args.seconds)
            rows.append(row)
            print(
                f"{name:18} batch {batch:3}: {row['items_per_s']:10.1f} items/s  p50 {row['p50_us']:9.1f} µs  "
                f"p99 {row['p99_us']:9.1f} µs",
                file=sys.stderr,
            )
        report["models"][name] = rows
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
