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
import aetcd.watcher
import grpc
from aetcd import rpc

from unimodel.core.transport_security import CredentialsError, EtcdAuth, TlsFiles

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


_ERRORS = (aetcd.exceptions.ClientError, grpc.RpcError, asyncio.TimeoutError, OSError, CredentialsError)


class _Client(aetcd.Client):  # type: ignore[misc]  # aetcd ships no type information
    """aetcd's client over a TLS channel when `tls` is set (aetcd itself only opens plaintext channels).

    Authentication (`username`/`password`) is aetcd's: one Authenticate call when the channel opens, its
    token sent with every call. etcd forgets its simple tokens when it restarts (and after their TTL
    unused): the next call then fails UNAUTHENTICATED, EtcdStore drops this client and the following
    call connects, and so authenticates, again."""

    def __init__(self, host: str, port: int, *, credentials: tuple[str, str] | None, tls: TlsFiles) -> None:
        user, password = credentials if credentials else (None, None)
        super().__init__(host=host, port=port, username=user, password=password)
        self._tls = tls
        self._is_connecting: bool = False

    async def connect(self) -> None:
        if not self._tls.enabled:
            await super().connect()
            return
        # aetcd's connect, with a TLS channel where aetcd opens a plaintext one.
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        ca, key, cert = self._tls.grpc_credentials()
        channel_credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        try:
            self._is_connecting = True
            self.channel = grpc.aio.secure_channel(f"{self._host}:{self._port}", channel_credentials, options=list(self._options.items()))
            if self._username is not None and self._password is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                request = rpc.AuthenticateRequest(name=self._username, password=self._password)
                self.metadata = (("token", (await self.auth_stub.Authenticate(request, timeout=self._timeout)).token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = aetcd.watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata)
            self._connected.set()
        except rpc.AioRpcError as exc:
            aetcd.exceptions._handle_exception(exc)  # aetcd's own mapping to its ClientError types
        finally:
            self._is_connecting = False


class EtcdStore(KeyValueStore):
    """etcd through aetcd; unary calls are bounded by `call_timeout_s`; rotates endpoints on failure."""

    def __init__(
        self, endpoints: list[tuple[str, int]], call_timeout_s: float = 3.0, *, auth: EtcdAuth | None = None
    ) -> None:
        self.endpoints = endpoints
        self.call_timeout_s = call_timeout_s
        self.auth = auth or EtcdAuth()
        self._index = 0
        self._client: aetcd.Client | None = None

    @property
    def endpoint(self) -> str:
        host, port = self.endpoints[self._index]
        return f"{host}:{port}"

    async def _get_client(self) -> aetcd.Client:
        if self._client is None:
            host, port = self.endpoints[self._index]
            client = _Client(host, port, credentials=self.auth.credentials(), tls=self.auth.tls)
            try:
                await asyncio.wait_for(client.connect(), self.call_timeout_s)
            except BaseException:
                await _close_quietly(client)
                raise
            self._client = client
        return self._client

    async def _fail(self, exc: BaseException) -> StoreError:
        """Drop the client (next call reconnects, to the next endpoint) and wrap the error."""
        failed = self.endpoint
        client, self._client = self._client, None
        self._index = (self._index + 1) % len(self.endpoints)
        if client is not None:
            await _close_quietly(client, 1.0)
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


async def _close_quietly(client: aetcd.Client, timeout_s: float = 2.0) -> None:
    try:
        await asyncio.wait_for(client.close(), timeout_s)
    except Exception as exc:
        log.debug("closing etcd client failed: %s", exc)
