#!/usr/bin/env python3
"""What one big request does to everyone else: /health/live and small :predict latency with and without a
~60 MB :predict in flight, on a local cluster (nats-server, etcd, router, batcher, one gpu-worker with the
built-in echo model, gateway; real processes, tests/helpers/support.py).

    .venv/bin/python scripts/bench/big_payloads.py [--mb 60] [--kind string|numbers|tensor] [--rounds 3]
        [--gateway-env UNIMODEL_OFFLOAD_BODY_BYTES=0] [--env UNIMODEL_SAME_HOST_BLOBS=false] [--sink] [--raw-client]
        [--json out.json]

Each round has two windows, interleaved so the machine drifts the same way for both: `baseline` (nothing big
in flight; as long as the previous big window) and `big` (from sending the big request until its answer is in).
In both, one caller GETs /health/live every 10 ms and another sends small predicts ({"input": "ping"}) back to
back; the window's latencies are pooled per kind over the rounds. The big request is sent from its own process,
which makes its body and connects before the window starts (neither its upload and download nor making the body
share this process's event loop). Reported: p50 / p99 / max per window kind,
the ratios big / baseline, the big request's status and time.

`--sink` (a control): the big request goes instead to a minimal server of its own (a blocking socket loop in another
process that reads the body into one buffer and sends it back: about the least CPU a server can spend moving those
bytes), while the probes still measure the gateway.
`--raw-client`: the big request comes from a plain socket instead of httpx (building and reading 60 MB in httpx costs
this 2-core host CPU that a client on another machine would not). What is left then is what the big client's upload and
download themselves cost this host (client, kernel, the least a server does), without any of our services.

`--kind tensor`: KServe v2 infer (`/v2/models/echo/infer`) with the binary tensor extension: one FP32 tensor of
mb MB after a JSON header, its answer binary too (what tritonclient sends for big tensors).
`--kind string`: {"input": "<mb MB of text>"}, the shape of a document or a base64 blob; `numbers`: a JSON list
of floats (encoded ~1.24x bigger on the bus: past ~50 MB it is a 413 naming the limit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
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
    if kind == "tensor":  # KServe v2 binary tensor extension: a JSON header, then the raw FP32 values
        return _tensor_header(size // 4) + b"\0\0\0?" * (size // 4)  # 0.5 each
    return b'{"input":"' + b"a" * size + b'"}'


def _tensor_header(n: int) -> bytes:
    return json.dumps({
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, n], "parameters": {"binary_data_size": 4 * n}}],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
    }).encode()


def big_route(base: str, mb: float, kind: str) -> tuple[str, dict[str, str]]:
    """The URL and headers of the big request: :predict, or KServe infer for `tensor`."""
    if kind == "tensor":
        length = len(_tensor_header(int(mb * 1_000_000) // 4))
        return f"{base}/v2/models/echo/infer", {
            "content-type": "application/octet-stream", "inference-header-content-length": str(length)
        }
    return f"{base}/v1/models/echo:predict", {"content-type": "application/json"}


def _send_big(base: str, mb: float, kind: str, conn: Any, raw: bool = False) -> None:
    """In the sender process: build the body, say ready, wait for "go", send it, report (status, detail, s)."""
    body = big_body(mb, kind)
    url, headers = big_route(base, mb, kind)
    if raw:
        return _send_big_raw(url, headers, body, conn)
    with httpx.Client(timeout=300) as client:
        client.get(f"{base}/health/live")  # connection open before the window starts
        conn.send("ready")
        conn.recv()
        t0 = time.perf_counter()
        try:
            r = client.post(url, content=body, headers=headers)
            status, detail = r.status_code, (r.text[:300] if r.status_code != 200 else f"{len(r.content)} bytes")
        except httpx.HTTPError as exc:
            status, detail = 0, repr(exc)
        conn.send((status, detail, time.perf_counter() - t0))


def _read_message(sock: socket.socket, pending: bytes) -> tuple[bytes, bytearray, bytes] | None:
    """One HTTP/1.1 message from `sock` (`pending`: bytes already read): (start line and headers, body read into
    one buffer by its Content-Length, bytes read past it); None when the peer closed."""
    while b"\r\n\r\n" not in pending:
        more = sock.recv(65536)
        if not more:
            return None
        pending += more
    head, _, pending = pending.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = bytearray(length)
    view = memoryview(body)
    got = min(len(pending), length)
    view[:got] = pending[:got]
    pending = pending[got:]
    while got < length:
        n = sock.recv_into(view[got:])
        if not n:
            return None
        got += n
    return head, body, pending


def _send_big_raw(url: str, headers: dict[str, str], body: bytes, conn: Any) -> None:
    """--raw-client: the big request from a plain socket (sendall of the prebuilt body, the answer read into one
    buffer): about the least CPU a client can spend sending and reading those bytes."""
    host, _, rest = url.removeprefix("http://").partition("/")
    address, _, port = host.partition(":")
    with socket.create_connection((address, int(port)), timeout=300) as sock:
        sock.sendall(f"GET /health/live HTTP/1.1\r\nhost: {host}\r\n\r\n".encode())
        got = _read_message(sock, b"")
        pending = got[2] if got else b""
        conn.send("ready")
        conn.recv()
        t0 = time.perf_counter()
        fields = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        head = f"POST /{rest} HTTP/1.1\r\nhost: {host}\r\n{fields}content-length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode())
        sock.sendall(body)
        got = _read_message(sock, pending)
        if got is None:
            conn.send((0, "connection closed", time.perf_counter() - t0))
            return
        status = int(got[0].split(b" ", 2)[1])
        detail = f"{len(got[1])} bytes" if status == 200 else bytes(got[1][:300]).decode(errors="replace")
        conn.send((status, detail, time.perf_counter() - t0))


def _sink(port_out: Any) -> None:
    """The --sink server: HTTP/1.1 keep-alive; answers each request with its own body (GET: `{}`)."""
    server = socket.create_server(("127.0.0.1", 0))
    port_out.send(server.getsockname()[1])
    while True:
        conn, _ = server.accept()
        with conn:
            pending = b""
            while (got := _read_message(conn, pending)) is not None:
                _, body, pending = got
                out = body or bytearray(b"{}")
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(out))
                conn.sendall(out)


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


async def window(
    base: str, seconds: float | None, big: tuple[float, str] | None, big_base: str = "", raw: bool = False
) -> dict[str, Any]:
    """One window: the probes, and with `big` (mb, kind) one big request sent by a process of its own that
    built its body and connected before the window starts (nothing of it runs in this process's loop)."""
    proc = conn = None
    if big is not None:
        ctx = multiprocessing.get_context("spawn")
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=_send_big, args=(big_base or base, *big, child, raw))
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


async def run(base: str, big: tuple[float, str], rounds: int, big_base: str = "", raw: bool = False) -> dict[str, Any]:
    pooled: dict[str, dict[str, list[float]]] = {k: {"live": [], "small": []} for k in ("baseline", "big")}
    bigs = []
    failures: list[str] = []
    last = 3.0
    for r in range(rounds):
        base_w = await window(base, last, None)
        big_w = await window(base, None, big, big_base, raw)
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
    parser.add_argument("--kind", choices=("string", "numbers", "tensor"), default="string")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gateway-env", action="append", default=[], help="NAME=VALUE for the gateway (repeatable)")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for every service (repeatable)")
    parser.add_argument("--sink", action="store_true", help="control: send the big request to a minimal server instead")
    parser.add_argument("--raw-client", action="store_true", help="send the big request from a plain socket, not httpx")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    size = len(big_body(args.mb, args.kind))
    print(f"big body: {size} bytes ({args.kind})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        infra = Infra(Path(tmp))
        services = Services(infra)
        try:
            infra.start()
            extra, every = dict(e.split("=", 1) for e in args.gateway_env), dict(e.split("=", 1) for e in args.env)
            if extra or every:
                env = infra.service_env
                infra.service_env = lambda kind: {**env(kind), **every, **(extra if kind == "gateway" else {})}  # type: ignore[method-assign]  # the services' extra settings
            services.start_cluster(all_six=False)
            for _ in range(50):  # echo ready
                if services.predict("warm").status_code == 200:
                    break
                time.sleep(0.2)
            big_base = ""
            if args.sink:
                ctx = multiprocessing.get_context("spawn")
                port_in, port_out = ctx.Pipe()
                sink = ctx.Process(target=_sink, args=(port_out,), daemon=True)  # ends with this process
                sink.start()
                big_base = f"http://127.0.0.1:{port_in.recv()}"
            result = asyncio.run(run(services.url, (args.mb, args.kind), args.rounds, big_base, args.raw_client))
        finally:
            services.stop()
            infra.stop()
    result["body_bytes"], result["kind"], result["gateway_env"], result["env"] = size, args.kind, args.gateway_env, args.env
    result["sink"], result["raw_client"] = args.sink, args.raw_client
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
