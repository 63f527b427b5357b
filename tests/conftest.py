from __future__ import annotations

import os
from pathlib import Path

import pytest

# The test process holds gRPC channels and starts servers with subprocess (fork, then exec). With gRPC's
# fork support on, the forked child restarts gRPC's poller before exec; when Popen has already closed the
# poller's epoll fd, the child aborts ("epoll_wait error: Bad file descriptor", grpc/grpc#43055) and the
# service never starts. Seen once in a fresh-clone run. The children exec at once and need no gRPC state.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

HERE = Path(__file__).parent

# tests/containers needs a Docker engine and the images scripts/test-containers builds; it runs only from there.
collect_ignore = [] if os.environ.get("UNIMODEL_TEST_CONTAINERS") == "1" else ["containers"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests under tests/integration and tests/e2e carry their marker without repeating it."""
    for item in items:
        parts = Path(str(item.fspath)).relative_to(HERE).parts
        if parts[0] in ("integration", "e2e", "containers"):
            item.add_marker(getattr(pytest.mark, parts[0]))


@pytest.fixture(scope="session")
def model_repository() -> Path:
    """The prepared test model repository (<repo>/.cache/test-models; built once per clone)."""
    from helpers.modelrepo import prepared_repository

    return prepared_repository()
