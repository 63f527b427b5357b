"""Service lifecycle in process, against real nats-server and etcd."""

from __future__ import annotations

import asyncio
import time

from support import Infra

from unimodel.core.registry import instance_key
from unimodel.core.store import EtcdStore
from unimodel.local.procs import free_port
from unimodel.worker.service import WorkerService
from unimodel.worker.settings import WorkerSettings


def settings(infra: Infra, **overrides: object) -> WorkerSettings:
    values: dict[str, object] = {
        "nats_url": infra.nats.url, "etcd_endpoints": infra.etcd.endpoint, "lease_ttl_s": 5, "instance_id": "w-life"
    }
    return WorkerSettings(**{**values, **overrides})


async def test_start_registers_and_stop_is_idempotent_and_leaves_etcd(infra: Infra) -> None:
    svc = WorkerService(settings(infra))
    await svc.start()
    store = EtcdStore([("127.0.0.1", infra.etcd.port)])
    key = instance_key("/unimodel/v1", "gpu-worker", "w-life").encode()
    try:
        assert svc.registration is not None
        await asyncio.wait_for(svc.registration.registered.wait(), 5)
        kvs, _ = await store.get_prefix(key)
        assert key in kvs
        await asyncio.gather(svc.stop(), svc.stop())  # concurrent stops share one shutdown
        await svc.stop()  # and a later one is a no-op
        kvs, _ = await store.get_prefix(key)
        assert kvs == {}  # the lease was revoked, not left to expire
        assert svc.bus.nc is None
    finally:
        await store.close()


async def test_stop_while_nats_is_unreachable_returns_promptly(infra: Infra) -> None:
    svc = WorkerService(settings(infra, nats_url=f"nats://127.0.0.1:{free_port()}"))
    start = asyncio.create_task(svc.start())
    await asyncio.sleep(0.5)  # start is retrying the connection
    assert not start.done()
    start.cancel()
    began = time.monotonic()
    await svc.stop()
    assert time.monotonic() - began < 5
