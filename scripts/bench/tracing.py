#!/usr/bin/env python3
"""What tracing costs: the batching benchmark's request (mlp, one row, HTTP, Triton's perf_analyzer) at
concurrency 16 against two local clusters side by side in one run, tracing off and tracing on (every
service exporting every span over OTLP/gRPC, sample ratio 1.0, to an OTLP receiver in its own process),
measured in alternation so the noisy machine drifts the same way for both.

    scripts/bench/setup_peers.sh          # once: perf_analyzer in .venv-peers
    .venv/bin/python scripts/bench/tracing.py [--rounds 3] [--interval-ms 4000] [--concurrency 16]
        [--json docs/benchmarks/tracing.json]

Also measured in-process: CPU per span of our tracer + OTLP encoding against the OpenTelemetry SDK's
TracerProvider + BatchSpanProcessor + OTLP exporter encoding (the reason the services do not use the SDK).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import perf  # noqa: E402  (after the sys.path lines that make it importable)

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
ATTRS = {"unimodel.model": "mlp", "unimodel.request_id": "0123456789abcdef0123456789abcdef", "unimodel.instance": "b-1"}


def receiver_main(port_out: multiprocessing.Queue, stop: multiprocessing.Event) -> None:
    """An OTLP/gRPC receiver that counts spans (a collector's ingest, without storage)."""
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    count = [0]

    class Service(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):  # noqa: N802  (gRPC method names are CamelCase)
            count[0] += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_out.put(port)
    stop.wait()
    port_out.put(count[0])
    server.stop(0)


def model_stats(http_port: int, model: str) -> tuple[int, int]:
    """(inference_count, execution_count) of the model, from the gateway's KServe statistics."""
    (entry,) = httpx.get(f"http://127.0.0.1:{http_port}/v2/models/{model}/stats", timeout=10).json()["model_stats"]
    return entry["inference_count"], entry["execution_count"]


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def span_costs(n: int = 20000) -> dict[str, float]:
    """µs of CPU per span (make + end + encode), ours vs the OpenTelemetry SDK's."""
    from unimodel.core import otlp, tracing

    ended: list[tracing.Span] = []
    tracing.enable(tracing.Tracer(ended.append, 1.0))
    t0 = time.process_time()
    for _ in range(n):
        s = tracing.start("batcher queue", PARENT, tracing.CONSUMER, ATTRS)
        s.set_attribute("unimodel.batch.size", 5)  # type: ignore[union-attr]  # the tracer samples every span (ratio 1): start() returned a Span
        s.end()  # type: ignore[union-attr]  # the tracer samples every span (ratio 1): start() returned a Span
    t1 = time.process_time()
    for i in range(0, n, 512):
        otlp.encode_request({"service.name": "bench"}, ended[i : i + 512])
    t2 = time.process_time()
    tracing.disable()

    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    kept: list[object] = []

    class Keep(SpanExporter):
        def export(self, spans):
            kept.extend(spans)
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Keep()))
    sdk = provider.get_tracer("bench")
    parent = TraceContextTextMapPropagator().extract({"traceparent": PARENT})
    t3 = time.process_time()
    for _ in range(n):
        s2 = sdk.start_span("batcher queue", parent, SpanKind.CONSUMER, ATTRS)
        s2.set_attribute("unimodel.batch.size", 5)
        s2.end()
    t4 = time.process_time()
    for i in range(0, n, 512):
        encode_spans(kept[i : i + 512]).SerializeToString()  # type: ignore[arg-type]  # kept: the SDK's ReadableSpans, collected as object
    t5 = time.process_time()
    return {
        "ours_make_end_us": round((t1 - t0) / n * 1e6, 2), "ours_encode_us": round((t2 - t1) / n * 1e6, 2),
        "sdk_make_end_us": round((t4 - t3) / n * 1e6, 2), "sdk_encode_us": round((t5 - t4) / n * 1e6, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--interval-ms", type=int, default=4000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--model", default="mlp")
    p.add_argument("--sample-ratio", type=float, default=1.0, help="UNIMODEL_OTEL_SAMPLE_RATIO of the traced cluster")
    p.add_argument("--json", default=str(ROOT / "docs" / "benchmarks" / "tracing.json"))
    args = p.parse_args(argv)
    from helpers.modelrepo import prepared_repository
    from unimodel.local.cluster import ClusterConfig, LocalCluster
    from unimodel.local.procs import free_port, wait_until

    costs = span_costs()
    print("CPU per span (µs):", costs, flush=True)
    repository = prepared_repository()
    ctx = multiprocessing.get_context("spawn")
    ports: multiprocessing.Queue = ctx.Queue()
    stop = ctx.Event()
    receiver = ctx.Process(target=receiver_main, args=(ports, stop), daemon=True)
    receiver.start()
    otlp_port = ports.get(timeout=30)
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        clusters: dict[str, tuple[LocalCluster, ClusterConfig]] = {}
        log = open(Path(tmp) / "clusters.log", "w")
        try:
            for mode in ("off", "on"):
                env = {} if mode == "off" else {
                    "UNIMODEL_OTEL_EXPORTER": "otlp-grpc", "UNIMODEL_OTEL_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
                    "UNIMODEL_OTEL_SAMPLE_RATIO": str(args.sample_ratio),
                }
                cfg = ClusterConfig(
                    state_dir=Path(tmp) / mode, http_port=free_port(), grpc_port=free_port(), nats_port=free_port(),
                    etcd_port=free_port(), log_level="warning", model_repository=repository, prepare_models=False,
                    load_models=args.model, extra_env=env,
                )
                cluster = LocalCluster(cfg, sink=log)
                clusters[mode] = (cluster, cfg)
                cluster.start()
                url = f"http://127.0.0.1:{cfg.http_port}"
                wait_until(
                    lambda url=url: httpx.get(f"{url}/v1/models/{args.model}/status", timeout=5).json().get("state") == "READY",
                    120, f"{args.model} ready ({mode})",
                )
                r = httpx.post(f"{url}/v1/models/{args.model}:predict", json={"input": [[0.0] * 384]}, timeout=10)
                traced = "x-unimodel-trace-id" in r.headers
                assert traced if mode == "on" and args.sample_ratio == 1.0 else (mode == "on" or not traced), (mode, r.headers)
            for rnd in range(args.rounds):
                order = ("off", "on") if rnd % 2 == 0 else ("on", "off")
                row: dict[str, object] = {"round": rnd + 1}

                def run(mode: str, row: dict[str, object] = row, rnd: int = rnd) -> None:
                    cluster, cfg = clusters[mode]
                    pids = {p.name: p.pid for p in cluster.services if p.pid}
                    pids["otlp-receiver"] = receiver.pid  # type: ignore[assignment]  # the receiver process has started: its pid is set
                    stats_before = model_stats(cfg.http_port, args.model)
                    before, started = {k: cpu_s(v) for k, v in pids.items()}, time.monotonic()
                    (m,) = perf.measure(
                        args.model, f"127.0.0.1:{cfg.http_port}", protocol="http", concurrencies=[args.concurrency],
                        measurement_interval_ms=args.interval_ms,
                    )
                    wall = time.monotonic() - started
                    stats_after = model_stats(cfg.http_port, args.model)
                    out = {k: m[k] for k in ("throughput", "p50_us", "p99_us", "stable")}
                    executions = stats_after[1] - stats_before[1]
                    out["mean_batch_rows"] = round((stats_after[0] - stats_before[0]) / max(1, executions), 2)
                    out["cpu_share"] = {k: round((cpu_s(v) - before[k]) / wall, 3) for k, v in pids.items()}
                    row[mode] = out
                    print(f"round {rnd + 1} tracing {mode}: {m['throughput']:.0f} infer/s p50 {m['p50_us']} p99 {m['p99_us']}"
                          f" batch rows {out['mean_batch_rows']}", flush=True)

                for mode in order:
                    run(mode)
                row["on_vs_off"] = round(row["on"]["throughput"] / row["off"]["throughput"], 3)  # type: ignore[index]  # row's per-mode results are dicts (row: dict[str, object])
                rows.append(row)
        finally:
            for cluster, _cfg in clusters.values():
                cluster.stop()
            log.close()
            stop.set()
    received = ports.get(timeout=30)
    receiver.join(10)
    ratios = [r["on_vs_off"] for r in rows]
    summary = {
        "median_on_vs_off": statistics.median(ratios),  # type: ignore[type-var]  # the rows' on_vs_off ratios are floats (rows hold object)
        "cost_pct": round((1 - statistics.median(ratios)) * 100, 1),  # type: ignore[operator, type-var]  # the rows' on_vs_off ratios are floats (rows hold object)
        "spans_received": received,
    }
    report = {
        "command": "scripts/bench/tracing.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model, "concurrency": args.concurrency, "interval_ms": args.interval_ms,
        "sample_ratio": args.sample_ratio,
        "span_cpu_us": costs, "rounds": rows, "summary": summary,
    }
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
