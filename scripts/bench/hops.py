#!/usr/bin/env python3
"""Latency of the echo request through the whole chain, beside bare NATS and bare gRPC round trips.

    .venv/bin/python scripts/bench/hops.py [--requests 3000] [--rounds 5] [--json docs/benchmarks/hops.json]

Starts a real local cluster (nats-server, etcd, all six services, echo on one gpu-worker) on free
ports, plus bare peers in their own processes: a NATS responder, a gRPC unary server, and a chain of
three trivial nats-py forwarders (client -> a -> b -> c -> client: four one-way NATS hops with no logic at
all; the echo chain crosses three since issue 19: gateway -> batcher -> worker -> gateway, the router off the
per-batch path, and four before). The
client sends one request at a time (concurrency 1), interleaving the methods in rounds so that the
noise of a shared machine hits all of them alike, and reports p50/p99 and ratios to the bare NATS round
trip. The HTTP client is a minimal keep-alive HTTP/1.1 client so client overhead stays out of the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAYLOAD = {"text": "hello", "values": [1, 2, 3]}


# --- bare peers (run in their own processes) ----------------------------------------------------------
async def nats_responder(url: str) -> None:
    import nats

    nc = await nats.connect(url)

    async def reply(msg):
        await msg.respond(msg.data)

    await nc.subscribe("bench.echo", cb=reply)
    print("ready", flush=True)
    await asyncio.Event().wait()


async def nats_forwarder(url: str, subject: str, nxt: str) -> None:
    """Forwards each message to `nxt` keeping the caller's inbox in a header; the last one answers it."""
    import nats

    nc = await nats.connect(url)
    if nxt == "-":

        async def forward(msg):
            await nc.publish(msg.headers["R"], msg.data)

    else:

        async def forward(msg):
            await nc.publish(nxt, msg.data, headers={"R": msg.headers["R"] if msg.headers else msg.reply})

    await nc.subscribe(subject, cb=forward)
    print("ready", flush=True)
    await asyncio.Event().wait()


async def grpc_server(port: int) -> None:
    import grpc

    from unimodel.v1 import inference_pb2, services_pb2_grpc

    class Echo(services_pb2_grpc.InferenceServiceServicer):
        async def Predict(self, request, context):  # noqa: N802  (gRPC method names are CamelCase)
            return inference_pb2.PredictResponse(model=request.model, output=request.input)

    server = grpc.aio.server()
    services_pb2_grpc.add_InferenceServiceServicer_to_server(Echo(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


# --- clients --------------------------------------------------------------------------------------------
class HttpClient:
    """Keep-alive HTTP/1.1 over one connection; just enough for JSON POSTs."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        assert self.reader and self.writer
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        return status, await self.reader.readexactly(length)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


async def measure(
    args: argparse.Namespace, cluster_ports: dict[str, int], nats_url: str, grpc_port: int, pids: dict[str, int]
) -> dict:
    import grpc
    import nats
    import orjson

    from unimodel.core.values import to_value
    from unimodel.v1 import inference_pb2, services_pb2_grpc

    nc = await nats.connect(nats_url)
    body = orjson.dumps({"input": PAYLOAD})
    proto = inference_pb2.PredictRequest(model="echo", input=to_value(PAYLOAD))
    proto_bytes = proto.SerializeToString()

    http = HttpClient(cluster_ports["http"])
    await http.connect()
    chain_channel = grpc.aio.insecure_channel(f"127.0.0.1:{cluster_ports['grpc']}")
    chain_stub = services_pb2_grpc.InferenceServiceStub(chain_channel)
    bare_channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
    bare_stub = services_pb2_grpc.InferenceServiceStub(bare_channel)

    async def bare_nats() -> None:
        await nc.request("bench.echo", proto_bytes, timeout=5)

    async def forward_chain() -> None:
        await nc.request("bench.fwd.a", proto_bytes, timeout=5)

    async def bare_grpc() -> None:
        await bare_stub.Predict(proto, timeout=5)

    async def chain_http() -> None:
        status, _ = await http.post("/v1/models/echo:predict", body)
        assert status == 200, status

    async def chain_grpc() -> None:
        await chain_stub.Predict(proto, timeout=5)

    methods: dict[str, Callable[[], Awaitable[None]]] = {
        "bare NATS request/reply": bare_nats,
        "bare gRPC unary": bare_grpc,
        "reference: 3 nats-py forwarders (4 one-way hops)": forward_chain,
        "echo chain via gateway gRPC": chain_grpc,
        "echo chain via gateway HTTP": chain_http,
    }
    samples: dict[str, list[float]] = {name: [] for name in methods}
    per_round = args.requests // args.rounds
    for fn in methods.values():  # warm-up
        for _ in range(200):
            await fn()
    for _ in range(args.rounds):
        for name, fn in methods.items():
            clock = time.perf_counter
            out = samples[name]
            for _ in range(per_round):
                t0 = clock()
                await fn()
                out.append(clock() - t0)
    # CPU per echo request of each process on the path (HTTP entry), after the latency rounds.
    n = max(1000, per_round)
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    client_before = time.process_time()
    for _ in range(n):
        await chain_http()
    cpu = {name: round((cpu_seconds(pid) - before[name]) / n * 1e6) for name, pid in pids.items()}
    cpu["client (this script)"] = round((time.process_time() - client_before) / n * 1e6)

    await nc.close()
    await chain_channel.close()
    await bare_channel.close()
    assert http.writer is not None
    http.writer.close()

    base = statistics.median(samples["bare NATS request/reply"])
    results = {}
    for name, s in samples.items():
        p50, p99 = percentile(s, 0.5), percentile(s, 0.99)
        results[name] = {
            "requests": len(s),
            "p50_us": round(p50 * 1e6, 1),
            "p99_us": round(p99 * 1e6, 1),
            "mean_us": round(statistics.fmean(s) * 1e6, 1),
            "p50_vs_bare_nats": round(p50 / base, 2),
        }
    return {"latency": results, "cpu_us_per_request": cpu}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000, help="requests per method (default 3000)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--json", default=str(ROOT / "docs" / "benchmarks" / "hops.json"), help="where to write figures")
    parser.add_argument("--role", choices=["nats-responder", "nats-forwarder", "grpc-server"], help=argparse.SUPPRESS)
    parser.add_argument("--subject", help=argparse.SUPPRESS)
    parser.add_argument("--next", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import uvloop

    if args.role == "nats-responder":
        uvloop.run(nats_responder(args.url))
        return 0
    if args.role == "nats-forwarder":
        uvloop.run(nats_forwarder(args.url, args.subject, args.next))
        return 0
    if args.role == "grpc-server":
        uvloop.run(grpc_server(args.port))
        return 0

    from unimodel.local.cluster import ClusterConfig, LocalCluster
    from unimodel.local.procs import free_port

    with tempfile.TemporaryDirectory() as tmp:
        log = open(Path(tmp) / "cluster.log", "w")
        cfg = ClusterConfig(
            state_dir=Path(tmp) / "state", http_port=free_port(), grpc_port=free_port(), nats_port=free_port(),
            etcd_port=free_port(), log_level="warning", prepare_models=False, load_models="",
            nats_tool_user="bench",  # the bare peers' NATS user (every subject): cluster.nats.url carries it
        )
        cluster = LocalCluster(cfg, sink=log)
        peers: list[subprocess.Popen[bytes]] = []
        try:
            cluster.start()
            assert cluster.nats is not None
            grpc_port = free_port()
            me = [sys.executable, __file__]
            url = cluster.nats.url
            roles = [
                ["--role", "nats-responder", "--url", url],
                ["--role", "grpc-server", "--port", str(grpc_port)],
                *(
                    ["--role", "nats-forwarder", "--url", url, "--subject", f"bench.fwd.{a}", "--next", b]
                    for a, b in (("a", "bench.fwd.b"), ("b", "bench.fwd.c"), ("c", "-"))
                ),
            ]
            for extra in roles:
                peer = subprocess.Popen([*me, *extra], stdout=subprocess.PIPE)
                assert peer.stdout is not None and peer.stdout.readline().strip() == b"ready"
                peers.append(peer)
            ports = {"http": cfg.http_port, "grpc": cfg.grpc_port}
            on_path = ("nats", "gateway", "batcher", "router", "gpu-worker")
            pids = {p.name: p.pid for p in (cluster.nats, *cluster.services) if p.name in on_path and p.pid}
            measured = uvloop.run(measure(args, ports, cluster.nats.url, grpc_port, pids))
        finally:
            for peer in peers:
                peer.terminate()
                peer.wait(10)
            cluster.stop()
            log.close()

    report = {
        "benchmark": "hops",
        "command": " ".join(["python scripts/bench/hops.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "concurrency": 1,
        "payload": PAYLOAD,
        "results": measured["latency"],
        "cpu_us_per_request": measured["cpu_us_per_request"],
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print("| method | p50 (µs) | p99 (µs) | p50 / bare NATS |\n|---|---:|---:|---:|")
    for name, r in measured["latency"].items():
        print(f"| {name} | {r['p50_us']:.0f} | {r['p99_us']:.0f} | {r['p50_vs_bare_nats']:.2f}× |")
    print("\n| process | CPU µs per HTTP echo request |\n|---|---:|")
    for name, us in measured["cpu_us_per_request"].items():
        print(f"| {name} | {us} |")
    print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
