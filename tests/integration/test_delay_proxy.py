"""The delaying TCP proxy of the chaos suite (tests/helpers/delay_proxy.py), as a real process between real
sockets on 127.0.0.1: an echo server upstream, the test's socket as the client."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from helpers.delay_proxy import DelayProxy, split_address

DELAY_MS = 200
SLACK_S = 0.3  # what a loaded 2-core machine adds to a delayed round trip, at most


class EchoServer:
    """Echoes each connection's bytes back; when the client half-closes, answers the rest and closes."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.eofs = 0  # connections whose client end of stream arrived
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
            self.eofs += 1
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[DelayProxy]:
    with DelayProxy({"echo": ("127.0.0.1:0", echo.address)}) as running:
        yield running
    assert not running.alive()


def connect(proxy: DelayProxy) -> socket.socket:
    sock = socket.create_connection(split_address(proxy.addresses["echo"]), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def receive(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        data = sock.recv(n - len(out))
        assert data, f"connection closed after {len(out)} of {n} bytes"
        out += data
    return out


def closed_by_peer(sock: socket.socket) -> bool:
    """The peer closed (end of stream) or reset the connection (times out after the socket's timeout)."""
    try:
        return sock.recv(10) == b""
    except ConnectionResetError:
        return True


def round_trip(sock: socket.socket, payload: bytes = b"ping") -> float:
    start = time.monotonic()
    sock.sendall(payload)
    assert receive(sock, len(payload)) == payload
    return time.monotonic() - start


def test_round_trip_is_twice_the_delay_and_switches_at_run_time(proxy: DelayProxy) -> None:
    with connect(proxy) as sock:
        assert round_trip(sock) < 0.1  # delay 0: plain forwarding
        proxy.set_delay(DELAY_MS)
        delayed = [round_trip(sock) for _ in range(3)]
        assert all(2 * DELAY_MS / 1000 <= t <= 2 * DELAY_MS / 1000 + SLACK_S for t in delayed), delayed
        proxy.set_delay(0)
        assert round_trip(sock) < 0.1
    with connect(proxy) as sock:  # a connection made after the switch back
        assert round_trip(sock) < 0.1


def test_pipelined_messages_keep_their_throughput(proxy: DelayProxy) -> None:
    """50 messages, 5 ms apart so that the proxy reads each alone: all are back one delay each way after
    the last was sent (a proxy that slept its delay per chunk would take 50 times as long)."""
    proxy.set_delay(DELAY_MS)
    messages = [f"message {i:03d};".encode() * 20 for i in range(50)]
    with connect(proxy) as sock:
        start = time.monotonic()
        for message in messages:
            sock.sendall(message)
            time.sleep(0.005)
        sent = time.monotonic() - start
        echoed = receive(sock, sum(map(len, messages)))
        took = time.monotonic() - start
    assert echoed == b"".join(messages)  # all of it, in order
    assert 2 * DELAY_MS / 1000 <= took <= sent + 2 * DELAY_MS / 1000 + SLACK_S, (sent, took)


def test_large_transfer_arrives_whole_and_in_order(proxy: DelayProxy) -> None:
    proxy.set_delay(20)
    payload = os.urandom(4 * 1024 * 1024)
    with connect(proxy) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        echoed = receive(sock, len(payload))
        sender.join()
    assert echoed == payload


def test_half_close_travels_with_the_delay(proxy: DelayProxy, echo: EchoServer) -> None:
    proxy.set_delay(DELAY_MS)
    with connect(proxy) as sock:
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)  # the echo server answers what it got, then closes
        start = time.monotonic()
        assert receive(sock, 10) == b"last words"
        assert sock.recv(10) == b""  # the server's close reached the client
        took = time.monotonic() - start
    assert echo.eofs == 1
    assert took <= 2 * DELAY_MS / 1000 + SLACK_S


def test_upstream_close_and_proxy_stop_close_the_client(echo: EchoServer) -> None:
    proxy = DelayProxy({"echo": ("127.0.0.1:0", echo.address)})
    proxy.start()
    try:
        with connect(proxy) as sock:
            assert round_trip(sock) < 0.1
            deadline = time.monotonic() + 5
            while not echo.conns and time.monotonic() < deadline:
                time.sleep(0.01)
            echo.conns[0].shutdown(socket.SHUT_RDWR)  # the upstream closes its end
            assert sock.recv(10) == b""
        with connect(proxy) as sock:
            assert round_trip(sock) < 0.1
            proxy.stop()  # every connection through the proxy ends with it
            assert not proxy.alive()
            assert closed_by_peer(sock)
        echo.close()
        with pytest.raises(OSError):  # nothing listens any more
            socket.create_connection(split_address(next(iter(proxy.addresses.values()))), timeout=2)
    finally:
        proxy.stop()


def test_unreachable_upstream_closes_the_connection() -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        gone = f"127.0.0.1:{placeholder.getsockname()[1]}"
    with DelayProxy({"echo": ("127.0.0.1:0", gone)}) as proxy, connect(proxy) as sock:
        assert closed_by_peer(sock)
