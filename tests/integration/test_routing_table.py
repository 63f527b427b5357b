"""Issue 19: the router off the per-batch path. The router publishes the routing table (workers, subjects,
models, slots, suspensions, loads, batchers); the batchers send each batch straight to a worker from it
(core/dispatch.py). With the table, a batch never crosses a router; with every router dead, the batchers keep
serving from the last table; a worker one batcher finds dead is suspended in the routers' next table, so the
other batchers stop sending to it too; a worker that joins while no router runs gets traffic once a router
publishes again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from helpers.predict_load import PredictLoad
from helpers.support import Infra, Services, delay_model, register_model
from unimodel.local.procs import ManagedProcess, wait_until
from unimodel.v1 import registry_pb2

pytestmark = pytest.mark.integration

MODEL = "tabled"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Services, dict[str, ManagedProcess]]]:
    infra = Infra(tmp_path)
    services = Services(infra)
    try:
        infra.start()
        procs = services.start_named("router-1", "batcher-1", "batcher-2", "worker-0", "worker-1")
        procs["router"] = procs.pop("router-1")
        register_model(infra, delay_model(MODEL, 20, max_batch_size=4))
        services.start_gateway()
        services.wait_models([MODEL], instances=2)
        for name in ("batcher-1", "batcher-2"):
            wait_until(lambda n=name: any("routing table from" in line for line in procs[n].lines), 15, f"{name} has a table")
        yield services, procs
    finally:
        services.stop()
        infra.stop()


def _path(services: Services) -> list[str]:
    r = services.predict([1.0], model=MODEL, timeout=15)
    assert r.status_code == 200, r.text
    return [hop.rsplit("-", 1)[0] for hop in r.headers["x-unimodel-path"].split(",")]


async def _one_table(url: str) -> registry_pb2.RoutingTable:
    nc = await nats.connect(url)
    try:
        sub = await nc.subscribe("unimodel.v1.routing.table")
        msg = await sub.next_msg(timeout=5)
        return registry_pb2.RoutingTable.FromString(msg.data)
    finally:
        await nc.close()


def test_batches_go_straight_to_workers_and_survive_the_routers_death(
    cluster: tuple[Services, dict[str, ManagedProcess]],
) -> None:
    services, procs = cluster
    table = asyncio.run(_one_table(services.infra.nats.url))
    assert table.router_id == "router-1"
    assert sorted(w.id for w in table.workers if MODEL in w.models) == ["worker-0", "worker-1"]
    assert sorted(table.batchers) == ["batcher-1", "batcher-2"]
    assert all(w.nats_subject for w in table.workers)
    assert {tuple(_path(services)) for _ in range(10)} == {("gateway", "batcher", "worker")}

    procs["router"].kill()  # SIGKILL: no router at all from here on
    with PredictLoad(services.url, MODEL, clients=8) as load:
        time.sleep(3.0)
    failed = [r for r in load.results if r[2] != 200]
    assert len(load.results) > 100 and not failed, f"{len(failed)} of {len(load.results)} failed: {failed[:3]}"

    # a worker that joins while no router runs is not in the batchers' table yet; the restarted router
    # publishes a table with it, and traffic reaches it
    services.start("gpu-worker", "--instance-id", "worker-2", name="worker-2")
    services.start("router", "--instance-id", "router-2", name="router-2")
    services.wait_models([MODEL], instances=3)
    seen: set[str] = set()

    def reached() -> bool:
        r = services.predict([1.0], model=MODEL, timeout=15)
        seen.add(r.headers.get("x-unimodel-worker", ""))
        return "worker-2" in seen

    wait_until(reached, 20, "a batch on the worker that joined while no router ran", every_s=0.05)


def test_a_worker_one_batcher_finds_dead_is_suspended_for_every_batcher(
    cluster: tuple[Services, dict[str, ManagedProcess]],
) -> None:
    services, procs = cluster
    with PredictLoad(services.url, MODEL, clients=8) as load:
        time.sleep(1.0)
        killed_at = time.monotonic()
        procs["worker-1"].kill()  # its lease lives on for the TTL: only the suspensions keep batches off it
        time.sleep(3.0)
    failed = [r for r in load.results if r[2] != 200]
    assert not failed, f"{len(failed)} of {len(load.results)} failed: {failed[:3]}"
    assert [r for r in load.results if r[0] > killed_at], "no request after the kill"
    router_log = "\n".join(procs["router"].lines)
    assert "worker worker-1 suspended" in router_log, router_log[-2000:]
    table = asyncio.run(_one_table(services.infra.nats.url))
    if any(w.id == "worker-1" for w in table.workers):  # its lease has not expired yet
        assert table.suspended_s["worker-1"] > 0
