"""Service lifecycle in process, against real nats-server and etcd."""

from __future__ import annotations

import asyncio
import time

from helpers.support import Infra
from unimodel.core.membership import instance_key
from unimodel.core.store import EtcdStore
from unimodel.local.procs import free_port
from unimodel.worker.service import WorkerService
from unimodel.worker.settings import WorkerSettings


def settings(infra: Infra, **overrides: object) -> WorkerSettings:
    values: dict[str, object] = {
        "nats_url": infra.nats.url, "etcd_endpoints": infra.etcd.endpoint, "lease_ttl_s": 5, "instance_id": "w-life",
        **infra.etcd_settings(),
    }
    return WorkerSettings(**{**values, **overrides})


async def test_start_registers_and_stop_is_idempotent_and_leaves_etcd(infra: Infra) -> None:
    svc = WorkerService(settings(infra))
    await svc.start()
    store = EtcdStore([("127.0.0.1", infra.etcd.port)], auth=infra.etcd_auth)
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


async def test_frequent_updates_do_not_starve_the_lease_keepalive(infra: Infra) -> None:
    """A value updated faster than the keepalive interval still gets its lease refreshed (a put does not
    renew a lease), so the key outlives many TTLs."""
    from unimodel.core.membership import Registration
    from unimodel.core.store import EtcdStore

    store = EtcdStore([("127.0.0.1", infra.etcd.port)], auth=infra.etcd_auth)
    reg = Registration(store, "/unimodel/v1/test/frequent", b"0", ttl_s=2)
    reg.start()
    try:
        await asyncio.wait_for(reg.registered.wait(), 10)
        first_lease = reg.lease_id
        for i in range(35):  # 7 s = 3.5 TTLs of updates every 0.2 s
            reg.update(str(i).encode())
            await asyncio.sleep(0.2)
        kvs, _ = await store.get_prefix(b"/unimodel/v1/test/")
        assert kvs == {b"/unimodel/v1/test/frequent": b"34"}
        assert reg.lease_id == first_lease  # never lost, never re-granted
    finally:
        await reg.leave()
        await store.close()
