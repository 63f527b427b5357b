"""The chaos suite: faults injected under load into one shared local cluster (tests/helpers/chaos_cluster.py).

Marked `chaos` (and `integration`, `slow`): `pytest -m "not chaos"` leaves it out. Each test records its
rows into the report (tests/helpers/chaos_report.py) before it asserts anything, so a broken promise still
leaves its measurement. At the end every process the suite started must be gone and the network namespace
deleted.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.chaos_cluster import ChaosCluster
from helpers.chaos_load import Greedy, greedy_reference
from helpers.chaos_net import Netns
from helpers.chaos_report import Report
from helpers.process_tree import alive, descendants

STREAM_BODY = {
    "model": "smol", "messages": [{"role": "user", "content": "Count from one to twenty in words, separated by commas."}],
    "temperature": 0, "max_tokens": 40, "stream": True, "stream_options": {"include_usage": True},
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos: fault injection under load (tests/chaos)")


@pytest.fixture(scope="session")
def chaos_report() -> Report:
    return Report.from_env()


@pytest.fixture(scope="session")
def chaos_net() -> Iterator[tuple[Netns | None, str]]:
    """The network namespace for one gpu-worker, or (None, why not)."""
    net, why = Netns.create()
    try:
        yield net, why
    finally:
        if net is not None:
            net.delete()
            assert not net.exists(), f"network namespace {net.name} left behind"


@pytest.fixture(scope="session")
def chaos(tmp_path_factory: pytest.TempPathFactory, model_repository: Path, chaos_net: tuple[Netns | None, str]) -> Iterator[ChaosCluster]:
    cluster = ChaosCluster(tmp_path_factory.mktemp("chaos"), model_repository, chaos_net[0])
    pids: list[int] = []
    try:
        cluster.start()
        yield cluster
    finally:
        procs = [*cluster.services.procs, cluster.infra.nats, cluster.infra.etcd, cluster.milvus]
        pids = [p.pid for p in procs if p is not None and p.pid]
        pids += [child for pid in pids for child in descendants(pid)]
        cluster.stop()
    left = [pid for pid in pids if alive(pid)]
    assert not left, f"processes left running after the chaos suite: {left}"


@pytest.fixture(scope="session")
def greedy(chaos: ChaosCluster) -> Greedy | None:
    """The uninterrupted greedy answer streams are checked against (None without the LLM)."""
    if not chaos.has_llm:
        return None
    return greedy_reference(chaos.gateways[0], STREAM_BODY)
