"""The SQLite scalar store (entries.EntryStore, blocking) behind the async ScalarStore interface: each
call runs whole on one of a few threads (each is one transaction on a connection of its own). One
replica only: two processes on one file wait on each other's write lock, and WAL on a network volume is
unsafe; replicas share store_postgres.PostgresStore instead."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
from collections.abc import Callable, Sequence
from typing import TypeVar, TypeVarTuple

from unimodel.cache.entries import EntryStore
from unimodel.cache.store import Accesses, Committed, Entry, LogRecord, NewEntry, Quotas, ScalarStore, StoreUnavailable

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

THREADS = 4


class SqliteStore(ScalarStore):
    kind = "sqlite"

    def __init__(self, entries: EntryStore, *, threads: int = THREADS) -> None:
        self.entries = entries
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="cache-sqlite")

    async def run(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        """A blocking call of the SQLite store on its threads; sqlite3 errors -> StoreUnavailable."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"the cache store failed ({' '.join(str(exc).split())[:200]})") from None

    def describe(self) -> str:
        return f"SQLite {self.entries.path}"

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._close)

    def _close(self) -> None:
        self.shutdown_threads()
        self.entries.close()

    def shutdown_threads(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    async def exact(self, scope: str, exact_key: str, not_before: float) -> Entry | None:
        return await self.run(self.entries.exact, scope, exact_key, not_before)

    async def get(self, scope: str, ids: Sequence[int], not_before: float) -> dict[int, Entry]:
        return await self.run(self.entries.get, scope, ids, not_before)

    async def stored(self, scope: str, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        return await self.run(self.entries.stored, scope, pairs)

    async def count(self, scope: str | None = None) -> int:
        return await self.run(self.entries.count, scope)

    async def count_tenant(self, tenant: str) -> int:
        return await self.run(self.entries.count_tenant, tenant)

    async def least_recent(self, scope: str, over: int) -> list[int]:
        return await self.run(self.entries.least_recent, scope, over)

    async def reserve(self, n: int, not_before: float, commit_by: float | None = None) -> list[int]:
        return await self.run(self.entries.reserve, n, not_before, commit_by)

    async def commit_insert(
        self, scope: str, model: str, tenant: str, items: Sequence[NewEntry], vector_ids: dict[int, int],
        now: float, quotas: Quotas, commit_by: float | None = None,
    ) -> Committed:
        return await self.run(self.entries.commit_insert, scope, model, tenant, items, vector_ids, now, quotas, commit_by)

    async def release(self, ids: Sequence[int]) -> None:
        await self.run(self.entries.release, ids)

    async def remove(self, scope: str, ids: Sequence[int], truncate: bool = False, commit_by: float | None = None) -> int:
        return await self.run(self.entries.remove, scope, ids, truncate, commit_by)

    async def expire(self, before: float, limit: int = 5000) -> int:
        return await self.run(self.entries.expire, before, limit)

    async def delete(self, ids: Sequence[int]) -> int:
        return await self.run(self.entries.delete, ids)

    async def reclaimable(self, now: float, limit: int = 1000) -> list[int]:
        return await self.run(self.entries.reclaimable, now, limit)

    async def forget(self, ids: Sequence[int], now: float) -> None:
        await self.run(self.entries.forget, ids, now)

    async def cleanup_pending(self) -> int:
        return await self.run(self.entries.cleanup_pending)

    async def touch(self, accesses: Accesses) -> None:
        await self.run(self.entries.touch, dict(accesses))

    async def log(self, records: Sequence[LogRecord], keep: int) -> None:
        await self.run(self.entries.log, records, keep)

    async def recent_log(self, scope: str, limit: int) -> list[LogRecord]:
        return await self.run(self.entries.recent_log, scope, limit)
