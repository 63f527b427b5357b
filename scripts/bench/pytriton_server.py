#!/usr/bin/env python3
"""NVIDIA PyTriton peer for the batching benchmark: UniModel's ONNX models behind Triton's dynamic batcher.

    .venv-peers/bin/python scripts/bench/pytriton_server.py --repository DIR --http-port P --grpc-port Q
        [--models mlp,all-minilm-l6-v2] [--intra-op-threads 0]

Runs in the peer venv (scripts/bench/setup_peers.sh). For each model it reads <DIR>/<model>/config.yaml (the
UniModel model repository format) and binds a PyTriton model with the SAME name, tensor names, datatypes and
per-item dims, the same `max_batch_size`, and `DynamicBatcher(max_queue_delay_microseconds =
batching.max_queue_delay_ms * 1000)` (plus preferred_batch_sizes when set), so one perf_analyzer command line
works against both servers. The inference callable is wrapped in PyTriton's @batch and runs one onnxruntime
InferenceSession (CPU provider) on <DIR>/<model>/model.onnx (or `file`). tritonserver binds HTTP and gRPC on
127.0.0.1 only; metrics are off unless --metrics-port is given. Prints one line `ready http=... grpc=...` once
every model is loaded and serves until SIGINT/SIGTERM.

Endpoints PyTriton protects with a token by default (statistics, model-repository, shared-memory, trace,
logging) are left open, since perf_analyzer reads /v2/models/<m>/stats for its server-side figures and the
server only listens on loopback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import sysconfig
import threading
from pathlib import Path

import numpy as np
import yaml

DEFAULT_MODELS = ("mlp", "all-minilm-l6-v2")
NUMPY_TYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.bytes_,
}


def read_config(folder: Path) -> dict:
    """The subset of UniModel's config.yaml the peer needs, with the same defaults as unimodel.core.modelconfig."""
    data = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    engine = data.get("engine") or "onnx"
    if engine != "onnx":
        raise SystemExit(f"pytriton_server: {folder.name}: engine {engine!r} is not onnx")
    batching = data.get("batching") or {}

    def specs(kind: str) -> list[tuple[str, str, tuple[int, ...]]]:
        out = []
        for spec in data.get(kind) or []:
            datatype = spec.get("datatype", "")
            if datatype not in NUMPY_TYPES:
                raise SystemExit(f"pytriton_server: {folder.name}: {kind} {spec.get('name')!r}: datatype {datatype!r}")
            out.append((spec["name"], datatype, tuple(int(d) for d in spec.get("dims") or ())))
        if not out:
            raise SystemExit(f"pytriton_server: {folder.name}: config.yaml lists no {kind}")
        return out

    return {
        "name": data.get("name") or folder.name,
        "version": int(data["version"]) if str(data.get("version") or "").isdigit() else 1,
        "file": folder / (data.get("file") or "model.onnx"),
        "max_batch_size": int(data.get("max_batch_size") or 0),
        "max_queue_delay_ms": float(batching.get("max_queue_delay_ms") or 0),
        "preferred_batch_sizes": [int(b) for b in batching.get("preferred_batch_sizes") or []],
        "inputs": specs("inputs"),
        "outputs": specs("outputs"),
    }


def make_session(path: Path, intra_op_threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if intra_op_threads > 0:
        options.intra_op_num_threads = intra_op_threads
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def bind_model(triton, config: dict, intra_op_threads: int) -> None:
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    session = make_session(config["file"], intra_op_threads)
    onnx_inputs = {i.name for i in session.get_inputs()}
    onnx_outputs = {o.name for o in session.get_outputs()}
    input_names = [name for name, _, _ in config["inputs"]]
    output_names = [name for name, _, _ in config["outputs"]]
    missing = (set(input_names) - onnx_inputs) | (set(output_names) - onnx_outputs)
    if missing:
        raise SystemExit(f"pytriton_server: {config['name']}: {config['file']} has no tensor(s) {sorted(missing)}")

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        results = session.run(output_names, {name: inputs[name] for name in input_names})
        return dict(zip(output_names, results, strict=True))  # one result per output asked for

    batching = config["max_batch_size"] > 0
    batcher = DynamicBatcher(
        max_queue_delay_microseconds=int(round(config["max_queue_delay_ms"] * 1000)),
        preferred_batch_size=config["preferred_batch_sizes"] or None,
    )
    triton.bind(
        model_name=config["name"],
        model_version=config["version"],
        infer_func=infer,
        inputs=[Tensor(name=n, dtype=NUMPY_TYPES[t], shape=dims) for n, t, dims in config["inputs"]],
        outputs=[Tensor(name=n, dtype=NUMPY_TYPES[t], shape=dims) for n, t, dims in config["outputs"]],
        config=ModelConfig(batching=batching, max_batch_size=max(config["max_batch_size"], 1), batcher=batcher),
        strict=False,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, required=True, help="UniModel model repository folder")
    parser.add_argument(
        "--models", default="", help=f"comma list (default: those of {','.join(DEFAULT_MODELS)} present)"
    )
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, default=0, help="0 = metrics off")
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument(
        "--intra-op-threads", type=int, default=0, help="onnxruntime intra-op threads; 0 = its default (as the worker)"
    )
    parser.add_argument("--verbose", action="store_true", help="PyTriton INFO logs and tritonserver's log")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    # tritonserver (a child of PyTriton) and its Python backend stub link libpython of the running interpreter.
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    if libdir and libdir not in paths:
        os.environ["LD_LIBRARY_PATH"] = ":".join([libdir, *paths])

    if args.models:
        names = [m.strip() for m in args.models.split(",") if m.strip()]
    else:
        names = [m for m in DEFAULT_MODELS if (args.repository / m / "config.yaml").is_file()]
    if not names:
        print(f"pytriton_server: no model of {', '.join(DEFAULT_MODELS)} in {args.repository}", file=sys.stderr)
        return 2
    configs = []
    for name in names:
        folder = args.repository / name
        if not (folder / "config.yaml").is_file():
            print(f"pytriton_server: no {folder}/config.yaml", file=sys.stderr)
            return 2
        configs.append(read_config(folder))

    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    triton_config = TritonConfig(
        http_address=args.address,
        http_port=args.http_port,
        grpc_address=args.address,
        grpc_port=args.grpc_port,
        allow_metrics=args.metrics_port > 0,
        metrics_port=args.metrics_port or None,
        metrics_address=args.address if args.metrics_port > 0 else None,
        log_verbose=1 if args.verbose else 0,
        exit_timeout_secs=5,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    triton = Triton(config=triton_config, security_config=TritonSecurityConfig(restricted_endpoints=[]))
    try:
        for config in configs:
            bind_model(triton, config, args.intra_op_threads)
        triton.run()
        summary = ", ".join(
            f"{c['name']}(max_batch_size={c['max_batch_size']}, "
            f"max_queue_delay_us={int(round(c['max_queue_delay_ms'] * 1000))})"
            for c in configs
        )
        print(
            f"ready http={args.address}:{args.http_port} grpc={args.address}:{args.grpc_port} models={summary}",
            flush=True,
        )
        while not stop.wait(1.0):
            if not triton.is_alive():
                print("pytriton_server: tritonserver or a model proxy died", file=sys.stderr)
                return 1
    finally:
        triton.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
