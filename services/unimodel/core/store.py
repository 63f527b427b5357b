"""Our interface to the coordination store (etcd), and its implementation on `aetcd`.

Services never import aetcd: they use :class:`KeyValueStore`, so the client library can be swapped
(etcd3aio, another store) in one file.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import aetcd
import aetcd.exceptions
import grpc

log = logging.getLogger("unimodel.store")

T = TypeVar("T")


class StoreError(Exception):
    """The store could not be reached or refused the call; callers retry with backoff."""


@dataclass(frozen=True, slots=True)
class WatchEvent:
    key: bytes
    value: bytes | None  # None = deleted


class KeyValueStore(abc.ABC):
    @abc.abstractmethod
    async def grant_lease(self, ttl_s: int) -> int: ...

    @abc.abstractmethod
    async def refresh_lease(self, lease_id: int) -> int:
        """Keep a lease alive; returns its remaining TTL (<= 0: the lease is gone)."""

    @abc.abstractmethod
    async def revoke_lease(self, lease_id: int) -> None: ...

    @abc.abstractmethod
    async def put(self, key: bytes, value: bytes, lease_id: int | None = None) -> None: ...

    @abc.abstractmethod
    async def delete(self, key: bytes) -> None: ...

    @abc.abstractmethod
    async def get_prefix(self, prefix: bytes) -> tuple[dict[bytes, bytes], int]:
        """All keys under `prefix` and the store revision they were read at."""

    @abc.abstractmethod
    def watch_prefix(self, prefix: bytes, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Changes under `prefix` from `start_revision` on; raises StoreError when the stream breaks."""

    @abc.abstractmethod
    async def close(self) -> None: ...


_ERRORS = (aetcd.exceptions.ClientError, grpc.RpcError, asyncio.TimeoutError, OSError)


class EtcdStore(KeyValueStore):
    """etcd through aetcd; unary calls are bounded by `call_timeout_s`; rotates endpoints on failure."""

    def __init__(self, endpoints: list[tuple[str, int]], call_timeout_s: float = 3.0) -> None:
        self.endpoints = endpoints
        self.call_timeout_s = call_timeout_s
        self._index = 0
        self._client: aetcd.Client | None = None

    @property
    def endpoint(self) -> str:
        host, port = self.endpoints[self._index]
        return f"{host}:{port}"

    async def _get_client(self) -> aetcd.Client:
        if self._client is None:
            host, port = self.endpoints[self._index]
            client = aetcd.Client(host=host, port=port)
            await client.connect()
            self._client = client
        return self._client

    async def _fail(self, exc: BaseException) -> StoreError:
        """Drop the client (next call reconnects, to the next endpoint) and wrap the error."""
        failed = self.endpoint
        client, self._client = self._client, None
        self._index = (self._index + 1) % len(self.endpoints)
        if client is not None:
            try:
                await asyncio.wait_for(client.close(), 1.0)
            except Exception as close_exc:
                log.debug("closing etcd client failed: %s", close_exc)
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return StoreError(f"etcd {failed}: {detail}")

    async def _call(self, call: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        try:
            client = await self._get_client()
            return await asyncio.wait_for(call(client), self.call_timeout_s)
        except _ERRORS as exc:
            raise await self._fail(exc) from None

    async def grant_lease(self, ttl_s: int) -> int:
        lease = await self._call(lambda c: c.lease(ttl_s))
        return int(lease.id)

    async def refresh_lease(self, lease_id: int) -> int:
        reply = await self._call(lambda c: c.refresh_lease(lease_id))
        return int(reply.TTL) if reply is not None else 0

    async def revoke_lease(self, lease_id: int) -> None:
        await self._call(lambda c: c.revoke_lease(lease_id))

    async def put(self, key: bytes, value: bytes, lease_id: int | None = None) -> None:
        await self._call(lambda c: c.put(key, value, lease=lease_id))

    async def delete(self, key: bytes) -> None:
        await self._call(lambda c: c.delete(key))

    async def get_prefix(self, prefix: bytes) -> tuple[dict[bytes, bytes], int]:
        result = await self._call(lambda c: c.get_prefix(prefix))
        return {kv.key: kv.value for kv in result}, int(result.header.revision)

    async def watch_prefix(self, prefix: bytes, start_revision: int) -> AsyncIterator[WatchEvent]:
        try:
            client = await self._get_client()
            watch = await asyncio.wait_for(client.watch_prefix(prefix, start_revision=start_revision), self.call_timeout_s)
        except _ERRORS as exc:
            raise await self._fail(exc) from None
        try:
            async for event in watch:
                deleted = event.kind == aetcd.rtypes.EventKind.DELETE
                yield WatchEvent(event.kv.key, None if deleted else event.kv.value)
        except _ERRORS as exc:
            raise await self._fail(exc) from None
        finally:
            try:
                await asyncio.wait_for(watch.cancel(), 1.0)
            except Exception as exc:
                log.debug("cancelling etcd watch failed: %s", exc)
        raise await self._fail(ConnectionError("watch stream ended"))

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await asyncio.wait_for(client.close(), 2.0)
            except Exception as exc:
                log.debug("closing etcd client failed: %s", exc)
