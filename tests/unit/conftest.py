"""Unit tests cannot reach the network: an autouse fixture blocks inet sockets (Ray Serve's habit)."""

from __future__ import annotations

import socket

import pytest

_INET = (socket.AF_INET, socket.AF_INET6)


class NetworkBlocked(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    real_connect, real_connect_ex, real_bind = socket.socket.connect, socket.socket.connect_ex, socket.socket.bind

    def guard(real):
        def wrapped(self: socket.socket, *args, **kwargs):
            if self.family in _INET:
                raise NetworkBlocked(f"unit tests may not use the network ({real.__name__} {args!r})")
            return real(self, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(socket.socket, "connect", guard(real_connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guard(real_connect_ex))
    monkeypatch.setattr(socket.socket, "bind", guard(real_bind))
