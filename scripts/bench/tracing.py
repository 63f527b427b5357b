#!/usr/bin/env python3
"""What tracing costs: the batching benchmark's request (mlp, one row, HTTP, Triton's perf_analyzer) at
concurrency 16 against two local clusters side by side in one run, tracing off and tracing on (every
service exporting every span over OTLP/gRPC, sample ratio 1.0, to an OTLP receiver in its own process),
measured in alternation so the noisy machine drifts the same way for both.

    scripts/bench/setup_peers.sh          # once: perf_analyzer in .venv-peers
    .venv/bin/python scripts/bench/tracing.py [--rounds 3] [--interval-ms 4000] [--concurrency 16]
        [--json docs/benchmarks/tracing.json] [--baseline [NAME=]TREE ...]

Each --baseline adds a cluster that traces too, its services run from TREE/services (e.g. a `git worktree`
of an earlier commit), named on-NAME (on-baseline without a NAME): tracing's cost before and after a
change, measured in the same run.
Each round also records each process's CPU per request (the services, NATS, the OTLP receiver).

Also measured in-process: CPU per span of our tracer + OTLP encoding against the OpenTelemetry SDK's
TracerProvider + BatchSpanProcessor + OTLP exporter encoding (the reason the services do not use the SDK).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
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
    p.add_argument("--baseline", action="append", default=[], metavar="[NAME=]TREE",
                   help="a source tree: one more traced cluster runs its services/ (repeatable)")
    args = p.parse_args(argv)
    import side_by_side as sbs

    costs = span_costs()
    print("CPU per span (µs):", costs, flush=True)
    ctx = multiprocessing.get_context("spawn")
    ports: multiprocessing.Queue = ctx.Queue()
    stop = ctx.Event()
    receiver = ctx.Process(target=receiver_main, args=(ports, stop), daemon=True)
    receiver.start()
    otlp_port = ports.get(timeout=30)
    traced_env = {
        "UNIMODEL_OTEL_EXPORTER": "otlp-grpc", "UNIMODEL_OTEL_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
        "UNIMODEL_OTEL_SAMPLE_RATIO": str(args.sample_ratio),
    }
    modes = [sbs.Mode("off"), sbs.Mode("on", env=traced_env)]
    trees: dict[str, str] = {}
    for spec in args.baseline:
        label, sep, tree = spec.rpartition("=")
        services = Path(tree).resolve() / "services"
        assert (services / "unimodel" / "core" / "tracing.py").is_file(), f"no UniModel services in {services}"
        trees[f"on-{label if sep else 'baseline'}"] = str(Path(tree).resolve())
        modes.append(sbs.Mode(f"on-{label if sep else 'baseline'}", env={**traced_env, "PYTHONPATH": str(services)}))
    names = [m.name for m in modes]
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "clusters.log", "w") as log:
        try:
            with sbs.clusters(modes, Path(tmp), args.model, log):
                for mode in modes:
                    r = httpx.post(f"{mode.url}/v1/models/{args.model}:predict", json={"input": [[0.0] * 384]}, timeout=10)
                    traced = "x-unimodel-trace-id" in r.headers
                    on = mode.name != "off"
                    assert traced if on and args.sample_ratio == 1.0 else (on or not traced), (mode.name, r.headers)
                for rnd in range(args.rounds):
                    row: dict[str, object] = {"round": rnd + 1}
                    for name in sbs.alternating(names, rnd):
                        mode = next(m for m in modes if m.name == name)

                        def run(mode: sbs.Mode = mode) -> dict[str, object]:
                            (m,) = perf.measure(
                                args.model, f"127.0.0.1:{mode.http_port}", protocol="http", concurrencies=[args.concurrency],
                                measurement_interval_ms=args.interval_ms,
                            )
                            return {k: m[k] for k in ("throughput", "p50_us", "p99_us", "stable")}

                        nats_pid = mode.cluster.nats.pid or 0  # mode.cluster: a LocalCluster once started
                        out = sbs.measured(mode, args.model, run, {"nats-server": nats_pid, "otlp-receiver": receiver.pid or 0})
                        throughput = float(out["throughput"])  # perf.measure's throughput
                        shares: dict[str, float] = out["cpu_share"]  # sbs.measured's
                        out["cpu_us_per_request"] = {k: round(v / throughput * 1e6) for k, v in shares.items() if v} if throughput else {}
                        row[name] = out
                        print(f"round {rnd + 1} tracing {name}: {throughput:.0f} infer/s p50 {out['p50_us']} "
                              f"p99 {out['p99_us']} batch rows {out['mean_batch_rows']} "
                              f"CPU µs/request {sum(out['cpu_us_per_request'].values())} {out['cpu_us_per_request']}", flush=True)
                    for name in names[1:]:
                        key = "on_vs_off" if name == "on" else f"{name}_vs_off"
                        row[key] = round(row[name]["throughput"] / row["off"]["throughput"], 3)  # type: ignore[index]  # row's per-mode results are dicts (row: dict[str, object])
                    rows.append(row)
        finally:
            stop.set()
    received = ports.get(timeout=30)
    receiver.join(10)
    ratios = [r["on_vs_off"] for r in rows]
    summary = {
        "median_on_vs_off": statistics.median(ratios),  # type: ignore[type-var]  # the rows' on_vs_off ratios are floats (rows hold object)
        "cost_pct": round((1 - statistics.median(ratios)) * 100, 1),  # type: ignore[operator, type-var]  # the rows' on_vs_off ratios are floats (rows hold object)
        "spans_received": received,
    }
    for name in names:  # CPU per request over all rounds: each process's median, and their sum
        per_process: dict[str, list[int]] = {}
        for row in rows:
            for k, v in row[name]["cpu_us_per_request"].items():  # type: ignore[index]  # row's per-mode results are dicts
                per_process.setdefault(k, []).append(v)
        medians = {k: statistics.median(v) for k, v in per_process.items()}
        summary[f"cpu_us_per_request_{name}"] = {**medians, "total": sum(medians.values())}
    for name, tree in trees.items():
        base = [r[f"{name}_vs_off"] for r in rows]
        summary[f"median_{name}_vs_off"] = statistics.median(base)  # type: ignore[type-var]  # floats (rows hold object)
        summary[f"{name}_cost_pct"] = round((1 - statistics.median(base)) * 100, 1)  # type: ignore[operator, type-var]  # floats (rows hold object)
        summary[f"{name}_tree"] = tree
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
