"""Membership in etcd: a registration kept alive by a lease, and prefix-watch discovery with a cache.

- :class:`Registration` puts one key bound to a lease (TTL) and keeps the lease alive. If etcd is
  unreachable it retries with backoff; if the lease was lost (expired during an outage) it grants a new
  one and puts the key again, without restarting the service.
- :class:`Discovery` mirrors every key under a prefix: a full read, then a watch from the next
  revision. The local cache keeps serving while etcd is down; on reconnect it re-reads and reports the
  difference.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Generic, TypeVar

from unimodel.core.backoff import Backoff
from unimodel.core.store import KeyValueStore, StoreError

log = logging.getLogger("unimodel.registry")

T = TypeVar("T")

LOG_EVERY_S = 5.0
"""A registration that keeps failing logs one line per this many seconds."""


class Registration:
    def __init__(self, store: KeyValueStore, key: str, value: bytes, ttl_s: int) -> None:
        self.store = store
        self.key = key.encode()
        self._value = value
        self.ttl_s = ttl_s
        self.lease_id: int | None = None
        self._next_refresh = 0.0
        self.registered = asyncio.Event()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"registration {self.key.decode()}")

    def update(self, value: bytes) -> None:
        """Publish a new value (e.g. the models an instance hosts) on the next keepalive tick."""
        self._value = value
        self._changed.set()

    async def _run(self) -> None:
        # Retries no further apart than the keepalive interval: when etcd comes back (it restores leases
        # with their full TTL) the lease is refreshed before it expires, so peers never see the instance
        # leave because of the outage.
        backoff = Backoff(maximum=self._interval())
        last_log = -math.inf
        lost_logged = False
        suspect = False  # after an error, check that the lease still exists before using it
        loop = asyncio.get_running_loop()
        while True:
            try:
                if self.lease_id is not None and suspect:
                    if await self.store.refresh_lease(self.lease_id) <= 0:
                        log.warning("lease of %s was lost; registering again", self.key.decode())
                        self.lease_id = None
                suspect = False
                if self.lease_id is None:
                    self.lease_id = await self.store.grant_lease(self.ttl_s)
                    self._next_refresh = loop.time() + self._interval()
                self._changed.clear()
                await self.store.put(self.key, self._value, self.lease_id)
                self.registered.set()
                if lost_logged:
                    log.info("registered again at %s", self.key.decode())
                else:
                    log.debug("registered at %s (lease %x, ttl %ss)", self.key.decode(), self.lease_id, self.ttl_s)
                lost_logged = False
                backoff.reset()
                await self._keepalive()
            except StoreError as exc:
                self.registered.clear()
                suspect = True
                delay = backoff.next()
                if loop.time() - last_log >= LOG_EVERY_S:  # one line per 5 s at most
                    last_log = loop.time()
                    log.warning("registration %s: %s; retrying in %.1fs", self.key.decode(), exc, delay)
                lost_logged = True
                await asyncio.sleep(delay)

    def _interval(self) -> float:
        return max(0.5, self.ttl_s / 3)

    async def _keepalive(self) -> None:
        """Refresh the lease every TTL/3 on a fixed schedule (value updates do not postpone it: a put does
        not renew a lease); return (to re-put) on a value change; re-grant a lost lease."""
        assert self.lease_id is not None
        loop = asyncio.get_running_loop()
        while True:
            left = self._next_refresh - loop.time()
            if left > 0:
                try:
                    await asyncio.wait_for(self._changed.wait(), left)
                    return  # value changed: put again with the same lease
                except TimeoutError:
                    pass
            self._next_refresh = loop.time() + self._interval()
            ttl = await self.store.refresh_lease(self.lease_id)
            if ttl <= 0:
                log.warning("lease of %s was lost; registering again", self.key.decode())
                self.lease_id = None
                return

    async def leave(self, timeout_s: float = 2.0) -> None:
        """Stop keepalive and revoke the lease, so peers see this instance go at once."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        lease_id, self.lease_id = self.lease_id, None
        self.registered.clear()
        if lease_id is None:
            return
        try:
            await asyncio.wait_for(self.store.revoke_lease(lease_id), timeout_s)
        except (TimeoutError, StoreError) as exc:
            log.warning("could not revoke lease (%s); the key expires with its TTL", exc)


class Discovery(Generic[T]):
    """Mirror of every key under `prefix`, decoded with `decode` (a key it decodes to None is left out);
    `on_change(key, old, new)` per change."""

    def __init__(
        self,
        store: KeyValueStore,
        prefix: str,
        decode: Callable[[bytes], T | None],
        on_change: Callable[[str, T | None, T | None], None] | None = None,
    ) -> None:
        self.store = store
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.decode = decode
        self.on_change = on_change
        self.items: dict[str, T] = {}
        self.synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"discovery {self.prefix}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def _decode(self, key: str, raw: bytes) -> T | None:
        try:
            return self.decode(raw)
        except Exception as exc:
            log.warning("ignoring undecodable value at %s: %s", key, exc)
            return None

    def apply(self, key: str, value: T | None) -> None:
        """Apply one change (a watch event, or a difference found on resync) and tell the listener."""
        old = self.items.get(key)
        if value is None:
            if key not in self.items:
                return
            del self.items[key]
        else:
            if old == value:
                return
            self.items[key] = value
        if self.on_change:
            try:
                self.on_change(key, old, value)
            except Exception:
                log.exception("discovery listener failed for %s", key)

    async def _run(self) -> None:
        backoff = Backoff()
        failing = False
        prefix = self.prefix.encode()
        while True:
            try:
                snapshot, revision = await self.store.get_prefix(prefix)
                fresh: dict[str, T] = {}
                for raw_key, raw in snapshot.items():
                    key = raw_key.decode()
                    value = self._decode(key, raw)
                    if value is not None:
                        fresh[key] = value
                for key in list(self.items):
                    if key not in fresh:
                        self.apply(key, None)
                for key, value in fresh.items():
                    self.apply(key, value)
                self.synced.set()
                if failing:
                    log.info("discovery of %s resynced (%d entries)", self.prefix, len(self.items))
                failing = False
                backoff.reset()
                async for event in self.store.watch_prefix(prefix, revision + 1):
                    key = event.key.decode()
                    self.apply(key, None if event.value is None else self._decode(key, event.value))
            except StoreError as exc:
                delay = backoff.next()
                log.warning(
                    "discovery of %s: %s; serving %d cached entries, retrying in %.1fs",
                    self.prefix, exc, len(self.items), delay,
                )
                failing = True
                await asyncio.sleep(delay)


def instance_key(prefix: str, kind: str, instance_id: str) -> str:
    return f"{prefix}/instances/{kind}/{instance_id}"


def instances_prefix(prefix: str, kind: str = "") -> str:
    return f"{prefix}/instances/{kind}/" if kind else f"{prefix}/instances/"


def model_key(prefix: str, name: str) -> str:
    return f"{prefix}/models/{name}"


def models_prefix(prefix: str) -> str:
    return f"{prefix}/models/"
