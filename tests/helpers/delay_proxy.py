"""A TCP proxy that delays what it forwards: the chaos suite's slow network, in user space (what Toxiproxy's
"latency" toxic does), for kernels without the sch_netem module.

The proxy runs as a process of its own (`DelayProxy` starts it with the test's Python and always stops it by
PID): for each forward it listens on one address and connects every accepted connection to one upstream
address. Each chunk read from either side is written to the other side `delay` after it was read, in order;
chunks are timestamped when read and written when due, so a connection keeps its throughput (50 messages
sent back to back all arrive about `delay` later, not 50 × `delay` later). A delay of 0 forwards at once.
End of stream (FIN) travels like data, so a half-close reaches the other side after the same delay; a reset
or error on either side closes both at once; stopping the proxy closes every connection.

What it does not delay: the TCP handshake and acknowledgements (the proxy acknowledges at once), unlike
netem, which delays every packet.

Control, over the child's stdin and stdout (one line each):
- at start it prints `listening <name> <host>:<port>` per forward (port 0 picks a free one), then `ready`
- `delay <ms>` sets the delay of every connection's chunks read from then on; it answers `delay <ms>`
- end of stdin (the parent closed it, or died) or SIGTERM: close every connection and exit

    python tests/helpers/delay_proxy.py --forward nats 10.0.0.1:0 127.0.0.1:4222 [--forward ...] [--delay-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import queue
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import TextIO

CHUNK = 64 * 1024
QUEUED_LIMIT = 16 * 1024 * 1024
"""Bytes one direction of one connection holds while they wait for their time; reading pauses above it."""
CONNECT_TIMEOUT_S = 5.0


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{address!r} is not host:port")
    return host.strip("[]"), int(port)


# the proxy (the child process) ----------------------------------------------------------------------


class _Direction:
    """One direction of one connection: chunks read from `reader` are written to `writer` when due."""

    def __init__(self, proxy: _Proxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.proxy, self.reader, self.writer = proxy, reader, writer
        self.chunks: deque[tuple[float, bytes]] = deque()  # (due, data); b"" = end of stream
        self.queued = 0
        self.changed = asyncio.Event()  # a chunk was added or written

    async def read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self.queued >= QUEUED_LIMIT:
                self.changed.clear()
                await self.changed.wait()
            data = await self.reader.read(CHUNK)
            self.chunks.append((loop.time() + self.proxy.delay_s, data))
            self.queued += len(data)
            self.changed.set()
            if not data:
                return

    async def write(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.chunks:
                self.changed.clear()
                await self.changed.wait()
            due, data = self.chunks.popleft()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                return
            self.writer.write(data)
            await self.writer.drain()
            self.queued -= len(data)
            self.changed.set()


class _Proxy:
    def __init__(self, forwards: list[tuple[str, str, str]], delay_ms: float) -> None:
        self.forwards = forwards
        self.delay_s = delay_ms / 1000
        self.servers: list[asyncio.Server] = []
        self.connections: set[asyncio.Task[None]] = set()
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        for name, listen, upstream in self.forwards:
            host, port = split_address(listen)
            target = split_address(upstream)
            server = await asyncio.start_server(functools.partial(self._accept, upstream=target), host, port, reuse_address=True)
            self.servers.append(server)
            bound = server.sockets[0].getsockname()
            print(f"listening {name} {bound[0]}:{bound[1]}", flush=True)
        print("ready", flush=True)
        control = asyncio.create_task(self._control())
        await self.stopping.wait()
        control.cancel()
        for server in self.servers:
            server.close()
        for task in list(self.connections):
            task.cancel()
        await asyncio.gather(*self.connections, control, return_exceptions=True)

    async def _control(self) -> None:
        """Commands on stdin; its end stops the proxy."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        try:
            while line := await reader.readline():
                words = line.decode().split()
                if len(words) == 2 and words[0] == "delay":
                    try:
                        ms = float(words[1])
                    except ValueError:
                        ms = -1.0
                    if ms >= 0:
                        self.delay_s = ms / 1000
                        print(f"delay {words[1]}", flush=True)
                        continue
                print(f"error: not a command: {line.decode().strip()!r} (delay <ms>)", flush=True)
        finally:
            self.stopping.set()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: tuple[str, int]) -> None:
        task = asyncio.create_task(self._connection(reader, writer, upstream))
        self.connections.add(task)
        task.add_done_callback(self.connections.discard)

    async def _connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter, upstream: tuple[str, int]) -> None:
        writers = [client_w]
        tasks: list[asyncio.Task[None]] = []
        clean = False
        try:
            try:
                up_r, up_w = await asyncio.wait_for(asyncio.open_connection(*upstream), CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError):
                return  # the client sees its connection reset
            writers.append(up_w)
            directions = (_Direction(self, client_r, up_w), _Direction(self, up_r, client_w))
            tasks = [asyncio.create_task(step()) for d in directions for step in (d.read, d.write)]
            await asyncio.gather(*tasks)  # until both ends of stream are forwarded, or the first error
            clean = True
        except OSError:
            pass  # a reset or error on one side: the other side is closed at once
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for writer in writers:
                if clean:
                    writer.close()
                else:  # an error, or the proxy stops (cancelled): nothing waits for a peer that may not answer
                    writer.transport.abort()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--forward", nargs=3, action="append", required=True, metavar=("NAME", "LISTEN", "UPSTREAM"),
        help="listen on LISTEN (host:port, port 0 = any free) and connect each connection to UPSTREAM (host:port)",
    )
    parser.add_argument("--delay-ms", type=float, default=0.0, help="delay at start (default 0)")
    args = parser.parse_args(argv)
    for _name, listen, upstream in args.forward:
        for address in (listen, upstream):
            try:
                split_address(address)
            except ValueError as exc:
                parser.error(str(exc))
    asyncio.run(_Proxy([(name, listen, upstream) for name, listen, upstream in args.forward], args.delay_ms).run())


# the parent's handle ---------------------------------------------------------------------------------


class DelayProxy:
    """The proxy as a child process. `start()` returns once it listens (`addresses`: name -> the host:port it
    listens on); `set_delay(ms)` returns once the new delay holds; `stop()` (idempotent) ends the process and
    every connection through it. Its output goes to `sink` (when given), prefixed."""

    def __init__(self, forwards: dict[str, tuple[str, str]], *, delay_ms: float = 0, sink: TextIO | None = None) -> None:
        self.forwards = forwards  # name -> (listen, upstream)
        self.delay_ms = delay_ms
        self.sink = sink
        self.addresses: dict[str, str] = {}
        self.proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._output: deque[str] = deque(maxlen=40)  # what it printed besides answers, for error messages
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 15) -> None:
        argv = [sys.executable, str(Path(__file__).resolve()), "--delay-ms", str(self.delay_ms)]
        for name, (listen, upstream) in self.forwards.items():
            argv += ["--forward", name, listen, upstream]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read, args=(self.proc,), name="delay-proxy-output", daemon=True)
        self._reader.start()
        try:
            while (line := self._answer(timeout)) != "ready":
                _, name, address = line.split()
                self.addresses[name] = address
        except BaseException:
            self.stop()
            raise

    def set_delay(self, ms: float, timeout: float = 5) -> None:
        if self.proc is None or self.proc.stdin is None or not self.alive():
            raise RuntimeError(f"delay proxy is not running{self._said()}")
        self.proc.stdin.write(f"delay {ms:g}\n")
        self.proc.stdin.flush()
        answer = self._answer(timeout)
        if answer != f"delay {ms:g}":
            raise RuntimeError(f"delay proxy answered {answer!r} to 'delay {ms:g}'")
        self.delay_ms = ms

    def stop(self, timeout: float = 5) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # the proxy's signal to close its connections and exit
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(timeout)

    def __enter__(self) -> DelayProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            if line == "ready" or line.startswith(("listening ", "delay ", "error: ")):
                self._lines.put(line)
            else:
                self._output.append(line)
            if self.sink is not None:
                self.sink.write(f"[delay-proxy] {line}\n")
        proc.stdout.close()
        self._lines.put(None)

    def _answer(self, timeout: float) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"delay proxy did not answer within {timeout:g}s{self._said()}") from None
        if line is None:
            self._lines.put(None)
            raise RuntimeError(f"delay proxy exited{self._said()}")
        return line

    def _said(self) -> str:
        return (": " + " | ".join(self._output)) if self._output else ""


if __name__ == "__main__":
    main()
