"""The cache's scalar store in PostgreSQL, through asyncpg (a connection pool, no ORM): the store that any
number of cache replicas share (compose, Kubernetes). The same contract as the SQLite store (store.py);
what makes it hold across replicas:

  - ids come from a sequence (`reserve(n)`: n nextval's in one statement); a sequence never hands a value
    out twice, rolled back or not, whichever replica asks;
  - UNIQUE (scope, exact_key, answer_key) (answer_key: a hash of the answer, which may be too long for an
    index) and `INSERT ... ON CONFLICT DO UPDATE`: a retried insert, or the same one through two replicas
    at once, refreshes the one entry; no second one can exist;
  - an insert, a removal and their eviction run under a transaction-level advisory lock of their scope
    (and, when a tenant or the whole store is over its quota, of that tenant, then of the store: always in
    that order, so no two writers wait on each other in a cycle). Victims are chosen least recently used
    first with `FOR UPDATE SKIP LOCKED` (an entry a hit is touching right now is not the least recent);
    TTL deletes skip locked rows too;
  - LRU times and hit counts (`touch`) and the hit log are written in batches by each replica (semantic.py
    buffers them); `touch` locks its rows in id order, so two replicas' batches cannot deadlock; a deadlock
    PostgreSQL still detects (a refresh and a touch) is retried;
  - the schema is created idempotently at start, under an advisory lock, so replicas may start together.

Writes given `commit_by` (time.time()) wait for a connection and for locks only until it, and commit only
before it (TooLate otherwise, rolled back). Failures of the server or the connection are StoreUnavailable.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from unimodel.cache.store import (
    Accesses,
    Changed,
    Committed,
    Entry,
    LogRecord,
    NewEntry,
    Quotas,
    ScalarStore,
    StoreUnavailable,
    TooLate,
)

if TYPE_CHECKING:
    from asyncpg import Connection, Pool

T = TypeVar("T")
log = logging.getLogger("unimodel.cache.store_postgres")

# advisory lock keys (pg_advisory_xact_lock(class, key)): one class per kind of lock
SCHEMA_LOCK = 0x554D4331  # "UMC1"
SCOPE_LOCK = 0x554D4332
TENANT_LOCK = 0x554D4333
STORE_LOCK = 0x554D4334
WRITE_ATTEMPTS = 3
"""A write that PostgreSQL aborted for a deadlock or a serialization failure runs again, at most this often."""

SCHEMA = """
CREATE SEQUENCE IF NOT EXISTS cache_entry_ids;
CREATE TABLE IF NOT EXISTS cache_entries (
    id BIGINT PRIMARY KEY,
    scope TEXT NOT NULL,
    model TEXT NOT NULL,
    tenant TEXT NOT NULL,
    exact_key TEXT NOT NULL,
    answer_key TEXT NOT NULL,
    query TEXT NOT NULL,
    answer TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    last_access DOUBLE PRECISION NOT NULL,
    hits BIGINT NOT NULL DEFAULT 0,
    CONSTRAINT cache_entries_unique UNIQUE (scope, exact_key, answer_key)
);
CREATE INDEX IF NOT EXISTS cache_entries_lru ON cache_entries (scope, last_access, id);
CREATE INDEX IF NOT EXISTS cache_entries_age ON cache_entries (created);
CREATE INDEX IF NOT EXISTS cache_entries_tenant ON cache_entries (tenant, last_access, id);
CREATE TABLE IF NOT EXISTS cache_hit_log (
    id BIGSERIAL PRIMARY KEY,
    time DOUBLE PRECISION NOT NULL,
    scope TEXT NOT NULL,
    model TEXT NOT NULL,
    query TEXT NOT NULL,
    hit BOOLEAN NOT NULL,
    exact BOOLEAN NOT NULL,
    similarity DOUBLE PRECISION NOT NULL,
    entry_id BIGINT NOT NULL,
    latency_ms DOUBLE PRECISION NOT NULL
);
ALTER TABLE cache_hit_log ADD COLUMN IF NOT EXISTS verdict SMALLINT NOT NULL DEFAULT 0;
ALTER TABLE cache_hit_log ADD COLUMN IF NOT EXISTS verify_score DOUBLE PRECISION NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS cache_hit_log_scope ON cache_hit_log (scope, id);
CREATE TABLE IF NOT EXISTS cache_vector_cleanup (
    id BIGINT PRIMARY KEY,
    not_before DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS cache_vector_cleanup_due ON cache_vector_cleanup (not_before);
"""

_ENTRY = "SELECT id, query, answer, created, last_access FROM cache_entries"
_RETRIED = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)
_AUTH = (asyncpg.exceptions.InvalidPasswordError, asyncpg.exceptions.InvalidAuthorizationSpecificationError)
_FAILURES = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


def answer_key(answer: str) -> str:
    """The answer's hash: the unique key holds it instead of the answer (up to max_answer_bytes)."""
    return hashlib.blake2b(answer.encode(), digest_size=16).hexdigest()


def redacted(url: str) -> str:
    """The URL without its password (for logs and errors)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def _text(value: str) -> str:
    """Query text as PostgreSQL's text can hold it (no NUL; the exact key is the hash of the original)."""
    return value.replace("\x00", "\ufffd")


def _entry(row: Any) -> Entry:
    return Entry(row[0], row[1], row[2], row[3], row[4])


class PostgresStore(ScalarStore):
    kind = "postgresql"

    def __init__(
        self, url: str, *, password: str = "", pool_size: int = 10, connect_timeout_s: float = 30.0,
        statement_timeout_s: float = 10.0,
    ) -> None:
        self.url, self.password = url, password
        self.pool_size, self.connect_timeout_s, self.statement_timeout_s = pool_size, connect_timeout_s, statement_timeout_s
        self._pool: Pool | None = None

    def describe(self) -> str:
        return f"PostgreSQL {redacted(self.url)}"

    # lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect (retrying until `connect_timeout_s`: the server may still be starting) and create the
        schema; StoreUnavailable when it cannot."""
        give_up = time.monotonic() + self.connect_timeout_s
        while True:
            try:
                self._pool = await asyncpg.create_pool(
                    self.url, password=self.password or None, min_size=1, max_size=self.pool_size,
                    command_timeout=self.statement_timeout_s,
                    timeout=max(1.0, min(10.0, give_up - time.monotonic())),
                )
                break
            except _AUTH as exc:
                raise StoreUnavailable(f"{self.describe()}: {_short(exc)}") from None
            except (*_FAILURES, ValueError) as exc:
                if isinstance(exc, ValueError) or time.monotonic() >= give_up:
                    raise StoreUnavailable(f"{self.describe()}: {_short(exc)}") from None
                log.info("waiting for %s: %s", self.describe(), _short(exc))
                await asyncio.sleep(0.5)
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
                await conn.execute(SCHEMA)
        except _FAILURES as exc:
            await self.close()
            raise StoreUnavailable(f"{self.describe()}: cannot create the cache schema: {_short(exc)}") from None

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 10)
            except (TimeoutError, *_FAILURES):
                pool.terminate()

    @property
    def pool(self) -> Pool:
        if self._pool is None:
            raise StoreUnavailable(f"{self.describe()}: not connected")
        return self._pool

    # calls ----------------------------------------------------------------------------------------
    async def _read(self, fn: Callable[[Pool], Awaitable[T]]) -> T:
        try:
            return await fn(self.pool)
        except _FAILURES as exc:
            raise StoreUnavailable(f"the cache store failed ({_short(exc)})") from None

    async def _write(self, work: Callable[[Connection], Awaitable[T]], commit_by: float | None = None) -> T:
        """`work` in one transaction, committed before `commit_by` or rolled back (TooLate); run again
        when PostgreSQL aborted it for a deadlock."""
        for attempt in range(WRITE_ATTEMPTS):
            try:
                return await self._write_once(work, commit_by)
            except _RETRIED as exc:
                if attempt + 1 == WRITE_ATTEMPTS:
                    raise StoreUnavailable(f"the cache store failed ({_short(exc)})") from None
                log.debug("cache write retried after %s", _short(exc))
            except (TooLate, Changed, StoreUnavailable):
                raise
            except _FAILURES as exc:
                if commit_by is not None and time.time() >= commit_by:
                    raise TooLate("the deadline passed while the write waited for the store") from None
                raise StoreUnavailable(f"the cache store failed ({_short(exc)})") from None
        raise AssertionError("unreachable")

    async def _write_once(self, work: Callable[[Connection], Awaitable[T]], commit_by: float | None) -> T:
        def left() -> float | None:
            if commit_by is None:
                return None
            remaining = commit_by - time.time()
            if remaining <= 0:
                raise TooLate("the deadline passed before the write could commit")
            return remaining

        if commit_by is not None and time.time() >= commit_by:
            raise TooLate("the deadline passed before the write could start")
        try:
            conn = await self.pool.acquire(timeout=left())
        except TimeoutError:
            raise TooLate("the deadline passed while the write waited for a connection") from None
        try:
            tr = conn.transaction()
            await tr.start()
            try:
                try:
                    async with asyncio.timeout(left()):  # waiting for locks ends at the deadline too
                        result = await work(conn)
                except TimeoutError:
                    if commit_by is None:
                        raise
                    raise TooLate("the deadline passed while the write waited for the store") from None
                left()  # commit only before the deadline
            except BaseException:
                try:
                    await asyncio.wait_for(tr.rollback(), 5)
                except BaseException:  # the connection is in no state to go on: drop it (nothing committed)
                    conn.terminate()
                raise
            await tr.commit()
            return result
        finally:
            await self.pool.release(conn)

    # reads ----------------------------------------------------------------------------------------
    async def exact(self, scope: str, exact_key: str, not_before: float) -> Entry | None:
        row = await self._read(lambda p: p.fetchrow(
            f"{_ENTRY} WHERE scope = $1 AND exact_key = $2 AND created >= $3 ORDER BY id DESC LIMIT 1",
            scope, exact_key, not_before,
        ))
        return _entry(row) if row is not None else None

    async def get(self, scope: str, ids: Sequence[int], not_before: float) -> dict[int, Entry]:
        if not ids:
            return {}
        rows = await self._read(lambda p: p.fetch(
            f"{_ENTRY} WHERE id = ANY($1::bigint[]) AND scope = $2 AND created >= $3", list(ids), scope, not_before,
        ))
        return {r[0]: _entry(r) for r in rows}

    async def stored(self, scope: str, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        if not pairs:
            return {}
        by_key = {(k, answer_key(a)): (k, a) for k, a in pairs}
        rows = await self._read(lambda p: p.fetch(
            "SELECT e.exact_key, e.answer_key, e.id FROM cache_entries e "
            "JOIN unnest($2::text[], $3::text[]) AS k(exact_key, answer_key) "
            "ON e.exact_key = k.exact_key AND e.answer_key = k.answer_key WHERE e.scope = $1",
            scope, [k for k, _ in by_key], [a for _, a in by_key],
        ))
        return {by_key[(r[0], r[1])]: r[2] for r in rows}

    async def count(self, scope: str | None = None) -> int:
        if scope is None:
            return int(await self._read(lambda p: p.fetchval("SELECT count(*) FROM cache_entries")))
        return int(await self._read(lambda p: p.fetchval("SELECT count(*) FROM cache_entries WHERE scope = $1", scope)))

    async def count_tenant(self, tenant: str) -> int:
        return int(await self._read(lambda p: p.fetchval("SELECT count(*) FROM cache_entries WHERE tenant = $1", tenant)))

    async def least_recent(self, scope: str, over: int) -> list[int]:
        if over <= 0:
            return []
        rows = await self._read(lambda p: p.fetch(
            "SELECT id FROM cache_entries WHERE scope = $1 ORDER BY last_access, id LIMIT $2", scope, over
        ))
        return [r[0] for r in rows]

    # inserts --------------------------------------------------------------------------------------
    async def reserve(self, n: int, not_before: float, commit_by: float | None = None) -> list[int]:
        async def work(conn: Connection) -> list[int]:
            rows = await conn.fetch(
                "INSERT INTO cache_vector_cleanup (id, not_before) "
                "SELECT nextval('cache_entry_ids'), $2 FROM generate_series(1, $1) RETURNING id",
                n, not_before,
            )
            return sorted(r[0] for r in rows)

        return await self._write(work, commit_by)

    async def commit_insert(
        self, scope: str, model: str, tenant: str, items: Sequence[NewEntry], vector_ids: dict[int, int],
        now: float, quotas: Quotas, commit_by: float | None = None,
    ) -> Committed:
        akeys = [answer_key(e.answer) for e in items]
        reserved = list(vector_ids.values())

        async def work(conn: Connection) -> Committed:
            out = Committed()
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", SCOPE_LOCK, scope)
            if reserved:
                held = await conn.fetchval(
                    "SELECT count(*) FROM (SELECT id FROM cache_vector_cleanup WHERE id = ANY($1::bigint[]) "
                    "ORDER BY id FOR UPDATE) c", reserved,
                )
                if held != len(reserved):  # reclaimed: only after their not_before, past the deadline
                    raise TooLate("the insert's reserved ids were reclaimed (its deadline passed)")
            ids: dict[tuple[str, str], int] = {}
            known = [i for i in range(len(items)) if i not in vector_ids]
            if known:  # stored when the insert was planned: refresh them (they may have gone meanwhile)
                rows = await conn.fetch(
                    "UPDATE cache_entries e SET created = $2, last_access = GREATEST(e.last_access, $2) "
                    "FROM unnest($3::text[], $4::text[]) AS k(exact_key, answer_key) "
                    "WHERE e.scope = $1 AND e.exact_key = k.exact_key AND e.answer_key = k.answer_key "
                    "RETURNING e.exact_key, e.answer_key, e.id",
                    scope, now, [items[i].exact_key for i in known], [akeys[i] for i in known],
                )
                ids.update({(r[0], r[1]): r[2] for r in rows})
                missing = [i for i in known if (items[i].exact_key, akeys[i]) not in ids]
                if missing:
                    raise Changed(missing)
            new = sorted(vector_ids, key=lambda i: (items[i].exact_key, akeys[i]))  # one lock order for all
            if new:
                rows = await conn.fetch(
                    "INSERT INTO cache_entries AS e "
                    "(id, scope, model, tenant, exact_key, answer_key, query, answer, created, last_access) "
                    "SELECT n.id, $1, $2, $3, n.exact_key, n.answer_key, n.query, n.answer, $4, $4 "
                    "FROM unnest($5::bigint[], $6::text[], $7::text[], $8::text[], $9::text[]) "
                    "AS n(id, exact_key, answer_key, query, answer) "
                    "ON CONFLICT (scope, exact_key, answer_key) DO UPDATE "
                    "SET created = EXCLUDED.created, last_access = GREATEST(e.last_access, EXCLUDED.last_access) "
                    "RETURNING e.exact_key, e.answer_key, e.id",
                    scope, model, tenant, now, [vector_ids[i] for i in new], [items[i].exact_key for i in new],
                    [akeys[i] for i in new], [_text(items[i].query) for i in new], [items[i].answer for i in new],
                )
                ids.update({(r[0], r[1]): r[2] for r in rows})
            used = [vector_ids[i] for i in new if ids[(items[i].exact_key, akeys[i])] == vector_ids[i]]
            unused = [vector_ids[i] for i in new if ids[(items[i].exact_key, akeys[i])] != vector_ids[i]]
            out.ids = [ids[(e.exact_key, k)] for e, k in zip(items, akeys, strict=True)]
            out.added, out.refreshed = len(used), len(known) + len(unused)
            if used:
                await conn.execute("DELETE FROM cache_vector_cleanup WHERE id = ANY($1::bigint[])", used)
            if unused:  # stored meanwhile by another insert (a retry, another replica): its vector goes
                await conn.execute("UPDATE cache_vector_cleanup SET not_before = 0 WHERE id = ANY($1::bigint[])", unused)
            out.evicted, out.entries = await _evict(conn, scope, tenant, quotas)
            return out

        return await self._write(work, commit_by)

    async def release(self, ids: Sequence[int]) -> None:
        async def work(conn: Connection) -> None:
            await conn.execute("UPDATE cache_vector_cleanup SET not_before = 0 WHERE id = ANY($1::bigint[])", list(ids))

        await self._write(work)

    # removals -------------------------------------------------------------------------------------
    async def remove(self, scope: str, ids: Sequence[int], truncate: bool = False, commit_by: float | None = None) -> int:
        async def work(conn: Connection) -> int:
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", SCOPE_LOCK, scope)
            if truncate:
                mine = [r[0] for r in await conn.fetch("SELECT id FROM cache_entries WHERE scope = $1", scope)]
            else:
                mine = [r[0] for r in await conn.fetch(
                    "SELECT id FROM cache_entries WHERE scope = $1 AND id = ANY($2::bigint[])", scope, list(ids)
                )]
            return await _delete(conn, mine)

        return await self._write(work, commit_by)

    async def expire(self, before: float, limit: int = 5000) -> int:
        async def work(conn: Connection) -> int:
            rows = await conn.fetch(
                "SELECT id FROM cache_entries WHERE created < $1 LIMIT $2 FOR UPDATE SKIP LOCKED", before, limit
            )
            return await _delete(conn, [r[0] for r in rows])

        return await self._write(work)

    async def delete(self, ids: Sequence[int]) -> int:
        async def work(conn: Connection) -> int:
            return await _delete(conn, list(ids))

        return await self._write(work)

    # vector cleanup -------------------------------------------------------------------------------
    async def reclaimable(self, now: float, limit: int = 1000) -> list[int]:
        rows = await self._read(lambda p: p.fetch(
            "SELECT c.id FROM cache_vector_cleanup c WHERE c.not_before <= $1 "
            "AND NOT EXISTS (SELECT 1 FROM cache_entries e WHERE e.id = c.id) ORDER BY c.not_before LIMIT $2",
            now, limit,
        ))
        return [r[0] for r in rows]

    async def forget(self, ids: Sequence[int], now: float) -> None:
        async def work(conn: Connection) -> None:
            await conn.execute(
                "DELETE FROM cache_vector_cleanup WHERE id = ANY($1::bigint[]) AND not_before <= $2", list(ids), now
            )

        await self._write(work)

    async def cleanup_pending(self) -> int:
        return int(await self._read(lambda p: p.fetchval("SELECT count(*) FROM cache_vector_cleanup")))

    # hits and the hit log -------------------------------------------------------------------------
    async def touch(self, accesses: Accesses) -> None:
        if not accesses:
            return
        order = sorted(accesses)

        async def work(conn: Connection) -> None:
            # rows locked in id order: two replicas' batches never wait on each other in a cycle
            await conn.execute(
                "SELECT 1 FROM cache_entries WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE", order
            )
            await conn.execute(
                "UPDATE cache_entries e SET last_access = GREATEST(e.last_access, t.at), hits = e.hits + t.n "
                "FROM unnest($1::bigint[], $2::float8[], $3::bigint[]) AS t(id, at, n) WHERE e.id = t.id",
                order, [accesses[i][0] for i in order], [accesses[i][1] for i in order],
            )

        await self._write(work)

    async def log(self, records: Sequence[LogRecord], keep: int) -> None:
        if not records:
            return

        async def work(conn: Connection) -> None:
            await conn.execute(
                "INSERT INTO cache_hit_log (time, scope, model, query, hit, exact, similarity, entry_id, latency_ms, "
                "verdict, verify_score) "
                "SELECT * FROM unnest($1::float8[], $2::text[], $3::text[], $4::text[], $5::bool[], $6::bool[], "
                "$7::float8[], $8::bigint[], $9::float8[], $10::int2[], $11::float8[])",
                [r.time for r in records], [r.scope for r in records], [r.model for r in records],
                [_text(r.query) for r in records], [r.hit for r in records], [r.exact for r in records],
                [r.similarity for r in records], [r.entry_id for r in records], [r.latency_ms for r in records],
                [r.verdict for r in records], [r.verify_score for r in records],
            )
            await conn.execute(
                "DELETE FROM cache_hit_log WHERE id <= (SELECT max(id) FROM cache_hit_log) - $1", keep
            )

        await self._write(work)

    async def recent_log(self, scope: str, limit: int) -> list[LogRecord]:
        rows = await self._read(lambda p: p.fetch(
            "SELECT time, scope, model, query, hit, exact, similarity, entry_id, latency_ms, verdict, verify_score "
            "FROM cache_hit_log WHERE scope = $1 ORDER BY id DESC LIMIT $2", scope, limit,
        ))
        return [LogRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10]) for r in rows]


# statements inside a caller's transaction -------------------------------------------------------------
async def _delete(conn: Connection, ids: list[int]) -> int:
    """Delete entries; their ids go to vector_cleanup (due at once) for their vectors."""
    if not ids:
        return 0
    removed = await conn.fetch("DELETE FROM cache_entries WHERE id = ANY($1::bigint[]) RETURNING id", ids)
    await conn.execute(
        "INSERT INTO cache_vector_cleanup (id, not_before) SELECT unnest($1::bigint[]), 0 "
        "ON CONFLICT (id) DO UPDATE SET not_before = 0", ids,
    )
    return len(removed)


async def _least_recent(conn: Connection, column: str, value: str, over: int) -> list[int]:
    """The `over` least recently used entries of a scope or tenant, locked; entries other writers hold
    (a hit being recorded) are skipped."""
    assert column in ("scope", "tenant")  # a column name, never input
    rows = await conn.fetch(
        f"SELECT id FROM cache_entries WHERE {column} = $1 ORDER BY last_access, id LIMIT $2 FOR UPDATE SKIP LOCKED",
        value, over,
    )
    return [r[0] for r in rows]


async def _evict(conn: Connection, scope: str, tenant: str, quotas: Quotas) -> tuple[dict[str, list[int]], int]:
    """Inside an insert's transaction, which holds its scope's lock: the least recently used entries of
    `tenant` (the inserter) over the quotas go, never another tenant's. Tenant, then store locks are taken
    only when over those quotas (the counts are read again under them). (reason -> ids evicted, entries
    in the store afterwards)."""
    evicted: dict[str, list[int]] = {}
    over = int(await conn.fetchval("SELECT count(*) FROM cache_entries WHERE scope = $1", scope)) - quotas.per_scope
    if over > 0:
        evicted["max_entries_per_scope"] = ids = await _least_recent(conn, "scope", scope, over)
        await _delete(conn, ids)
    if tenant:
        count_tenant = "SELECT count(*) FROM cache_entries WHERE tenant = $1"
        if int(await conn.fetchval(count_tenant, tenant)) > quotas.per_tenant:
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", TENANT_LOCK, tenant)
            over = int(await conn.fetchval(count_tenant, tenant)) - quotas.per_tenant
            if over > 0:
                evicted["max_entries_per_tenant"] = ids = await _least_recent(conn, "tenant", tenant, over)
                await _delete(conn, ids)
    count_all = "SELECT count(*) FROM cache_entries"
    total = int(await conn.fetchval(count_all))
    if total > quotas.overall:
        await conn.execute("SELECT pg_advisory_xact_lock($1)", STORE_LOCK)
        total = int(await conn.fetchval(count_all))
        over = total - quotas.overall
        if over > 0:  # the store is full: the inserter makes room among its own entries
            evicted["max_entries"] = ids = await _least_recent(conn, "tenant", tenant, over)
            total -= await _delete(conn, ids)
    return evicted, total
