"""A service's gRPC server: made when the service starts, so a service built and never started leaves
nothing of gRPC behind at interpreter exit."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from unimodel.core.grpc_server import GrpcServer

# A service built and never started, kept alive to the very end of interpreter shutdown (sys's own dict is
# cleared last), as module-level caches keep the services unit tests build (FastAPI's, for one, holds the
# gateway's route endpoints). It used to hold a grpc.aio server that never started: freed after grpc's
# module globals were cleared, its __dealloc__ failed and CPython printed "Error in sys.excepthook".
NEVER_STARTED = """
import asyncio, sys
from unimodel.core.lifecycle import Service
from unimodel.core.settings import CommonSettings

async def build():
    return Service(CommonSettings(instance_id="never-started"))

sys.unimodel_kept = asyncio.run(build())
"""


def test_a_service_that_never_starts_exits_without_errors() -> None:
    proc = subprocess.run([sys.executable, "-c", NEVER_STARTED], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Error in sys.excepthook" not in proc.stderr and "Original exception was" not in proc.stderr, proc.stderr


async def test_the_server_is_made_on_first_use_with_the_servicers_added_before(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[object] = []

    class FakeServer:  # what the health servicer's registration calls
        def add_generic_rpc_handlers(self, handlers: object) -> None: ...
        def add_registered_method_handlers(self, name: str, handlers: object) -> None: ...

    def fake_server(**kwargs: object) -> FakeServer:
        made.append(kwargs)
        return FakeServer()

    monkeypatch.setattr(grpc.aio, "server", fake_server)
    added: list[tuple[object, object]] = []
    wrapper = GrpcServer("127.0.0.1", 0)
    wrapper.add(lambda servicer, server: added.append((servicer, server)), "before", "test.Before")
    await wrapper.stop(0)  # never started: nothing to stop
    assert made == [] and added == []  # nothing of gRPC is made until the server is needed
    server = wrapper.server
    wrapper.add(lambda servicer, server: added.append((servicer, server)), "after", "test.After")
    assert len(made) == 1 and wrapper.server is server
    # after the health servicer; each servicer registers through grpc_decode's guard, in front of the server
    assert [(name, getattr(seen, "server", seen)) for name, seen in added[-2:]] == [("before", server), ("after", server)]
