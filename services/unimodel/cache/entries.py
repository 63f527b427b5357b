"""The cache's scalar store in SQLite, the embedded default of one replica: entries (query text, answer,
scope, times), the hit log, and the ids whose vectors Milvus may hold without an entry (`vector_cleanup`).
store.py has the interface the cache uses (store_sqlite.py runs these blocking calls on threads for it);
store_postgres.py is the same store in PostgreSQL, shared by replicas.

Plain logic, blocking calls (the cache runs them on executor threads). Every method is one complete unit
of work on a connection it holds alone for the call: it begins and ends its own transaction, so no
transaction outlives a call, a cancelled caller cannot leave one open, and no request's ROLLBACK or COMMIT
ever lands on another request's work. Writers take `_write_lock` (one writer at a time in this process;
SQLite's busy timeout covers a writer in another process), waiting at most until their deadline.

An insert (semantic.py) takes three steps, so that an entry is in both stores or in neither, and an insert
that answers an error has stored nothing:
  1. `reserve(n, ...)`: n new ids, never used again (the entries' AUTOINCREMENT sequence moves past them
     in a committed transaction), each recorded in vector_cleanup with `not_before` = the insert's
     deadline plus a grace;
  2. the vectors go to Milvus under those ids;
  3. `commit_insert(...)`: one transaction stores the entries (or refreshes the ones already stored: a
     retried insert adds nothing), drops the ids it used from vector_cleanup, evicts over the limits
     (the evicted ids go to vector_cleanup) and commits only before its commit deadline (`TooLate`
     otherwise, and nothing is written).
`reclaim` then deletes from Milvus the vectors of vector_cleanup's ids that have no entry once their
`not_before` has passed: leftovers of failed, late or cancelled inserts (an insert cannot commit after its
deadline, so after it nothing will claim them), of a process that died between steps 2 and 3, and the
vectors of evicted, expired and removed entries. Until then a query skips a vector without its entry.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from unimodel.cache.store import Changed, Committed, Entry, LogRecord, NewEntry, Quotas, TooLate

__all__ = [
    "Changed", "Committed", "Entry", "EntryStore", "LogRecord", "NewEntry", "Quotas", "TooLate",
]

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    scope TEXT NOT NULL,
    model TEXT NOT NULL,
    tenant TEXT NOT NULL,
    exact_key TEXT NOT NULL,
    query TEXT NOT NULL,
    answer TEXT NOT NULL,
    created REAL NOT NULL,
    last_access REAL NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS entries_exact ON entries (scope, exact_key);
CREATE INDEX IF NOT EXISTS entries_lru ON entries (scope, last_access);
CREATE INDEX IF NOT EXISTS entries_age ON entries (created);
CREATE INDEX IF NOT EXISTS entries_access ON entries (last_access);
CREATE INDEX IF NOT EXISTS entries_tenant ON entries (tenant, last_access);
CREATE TABLE IF NOT EXISTS hit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    scope TEXT NOT NULL,
    model TEXT NOT NULL,
    query TEXT NOT NULL,
    hit INTEGER NOT NULL,
    exact INTEGER NOT NULL,
    similarity REAL NOT NULL,
    entry_id INTEGER NOT NULL,
    latency_ms REAL NOT NULL,
    verdict INTEGER NOT NULL DEFAULT 0,
    verify_score REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS hit_log_scope ON hit_log (scope, id);
CREATE TABLE IF NOT EXISTS vector_cleanup (
    id INTEGER PRIMARY KEY,
    not_before REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS vector_cleanup_due ON vector_cleanup (not_before);
"""
HIT_LOG_ADDED = {"verdict": "INTEGER NOT NULL DEFAULT 0", "verify_score": "REAL NOT NULL DEFAULT 0"}
"""Columns added to hit_log after its first release: a store made before them gains them when opened."""

_CHUNK = 500
"""Ids per `IN (...)` list (SQLite allows 32766 variables; small lists keep statements cheap)."""


BY_ID_ONLY = "+"
"""SQLite's unary plus on a column keeps the planner off that column's indexes, so a few ids are looked up by
primary key. Without it (and without ANALYZE statistics), `id IN (4 or more ids) AND scope = ?` made SQLite
pick the (scope, last_access) index and read every entry of the scope: 5.5 ms at 100k entries on a semantic
lookup with 4 or more candidates."""


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _chunks(ids: Sequence[int]) -> Iterator[Sequence[int]]:
    for start in range(0, len(ids), _CHUNK):
        yield ids[start : start + _CHUNK]


class EntryStore:
    def __init__(self, path: str | Path, *, busy_timeout_s: float = 5.0) -> None:
        if str(path) == ":memory:" or not str(path):
            raise ValueError("the cache store needs a file (each connection of ':memory:' is a database of its own)")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        self.busy_timeout_s = busy_timeout_s
        self._idle: list[sqlite3.Connection] = []
        self._pool_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        with self._connection() as db:
            db.executescript(SCHEMA)
            _add_columns(db, "hit_log", HIT_LOG_ADDED)

    # connections -----------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=self.busy_timeout_s)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """A connection for this call alone (one at a time per thread; it moves between threads only
        between calls)."""
        with self._pool_lock:
            if self._closed:
                raise sqlite3.ProgrammingError("the cache store is closed")
            db = self._idle.pop() if self._idle else None
        if db is None:
            db = self._connect()
        try:
            yield db
        finally:
            if db.in_transaction:  # never happens (every write ends its own); never hand one on open
                db.execute("ROLLBACK")
            with self._pool_lock:
                if self._closed:
                    db.close()
                else:
                    self._idle.append(db)

    @contextmanager
    def _transaction(self, commit_by: float | None = None) -> Iterator[sqlite3.Connection]:
        """A write transaction on a connection of its own, committed when the block ends, and only if
        `commit_by` (time.time()) has not passed: else (TooLate), or on any error, rolled back. Waiting
        for the write lock ends at `commit_by` too."""
        wait = self.busy_timeout_s if commit_by is None else commit_by - time.time()
        if wait <= 0:
            raise TooLate("the deadline passed before the write could start")
        if not self._write_lock.acquire(timeout=wait):
            if commit_by is not None:
                raise TooLate("the deadline passed while the write waited for the store")
            raise sqlite3.OperationalError("database is locked")
        try:
            with self._connection() as db:
                db.execute(f"PRAGMA busy_timeout = {max(1, int(wait * 1000))}")
                try:
                    db.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError as exc:
                    # with a deadline, the busy timeout ends at it: locked means the deadline came
                    if commit_by is not None and ("locked" in str(exc) or time.time() >= commit_by):
                        raise TooLate("the deadline passed while the write waited for the store") from None
                    raise
                try:
                    yield db
                    if commit_by is not None and time.time() >= commit_by:
                        raise TooLate("the deadline passed before the write could commit")
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
        finally:
            self._write_lock.release()

    def close(self) -> None:
        with self._pool_lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for db in idle:
            db.close()

    # reads -----------------------------------------------------------------------------------------
    def exact(self, scope: str, exact_key: str, not_before: float) -> Entry | None:
        with self._connection() as db:
            row = db.execute(
                "SELECT id, query, answer, created, last_access FROM entries WHERE scope = ? AND exact_key = ? "
                "AND created >= ? ORDER BY id DESC LIMIT 1",
                (scope, exact_key, not_before),
            ).fetchone()
        return Entry(*row) if row else None

    def get(self, scope: str, ids: Sequence[int], not_before: float) -> dict[int, Entry]:
        """The entries of `ids` that belong to `scope` and were created at or after `not_before`."""
        if not ids:
            return {}
        with self._connection() as db:
            rows = db.execute(
                f"SELECT id, query, answer, created, last_access FROM entries WHERE id IN ({_marks(len(ids))}) "
                f"AND {BY_ID_ONLY}scope = ? AND {BY_ID_ONLY}created >= ?",
                (*ids, scope, not_before),
            ).fetchall()
        return {r[0]: Entry(*r) for r in rows}

    def stored(self, scope: str, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """(exact key, answer) -> id of the entry of `scope` that already holds that question and answer."""
        found: dict[tuple[str, str], int] = {}
        with self._connection() as db:
            for exact_key, answer in pairs:
                row = _stored(db, scope, exact_key, answer)
                if row is not None:
                    found[(exact_key, answer)] = row
        return found

    def count(self, scope: str | None = None) -> int:
        with self._connection() as db:
            return _count(db, scope)

    def count_tenant(self, tenant: str) -> int:
        """Entries of one tenant, in all its scopes (models)."""
        with self._connection() as db:
            return _count_tenant(db, tenant)

    def ids_of(self, scope: str, ids: Sequence[int]) -> list[int]:
        with self._connection() as db:
            return _ids_of(db, scope, ids)

    def scope_ids(self, scope: str) -> list[int]:
        with self._connection() as db:
            return [r[0] for r in db.execute("SELECT id FROM entries WHERE scope = ?", (scope,))]

    def least_recent(self, scope: str, over: int) -> list[int]:
        """The `over` least recently used entries of `scope` (eviction by max entries per scope)."""
        with self._connection() as db:
            return _least_recent(db, "scope", scope, over)

    def least_recent_of_tenant(self, tenant: str, over: int) -> list[int]:
        """The `over` least recently used entries of one tenant, in all its scopes (per-tenant eviction:
        a tenant's inserts only ever evict its own entries)."""
        with self._connection() as db:
            return _least_recent(db, "tenant", tenant, over)

    def least_recent_overall(self, over: int) -> list[tuple[int, str]]:
        if over <= 0:
            return []
        with self._connection() as db:
            rows = db.execute("SELECT id, scope FROM entries ORDER BY last_access, id LIMIT ?", (over,)).fetchall()
        return [(r[0], r[1]) for r in rows]

    def expired(self, before: float, limit: int = 5000) -> list[int]:
        with self._connection() as db:
            rows = db.execute("SELECT id FROM entries WHERE created < ? LIMIT ?", (before, limit)).fetchall()
        return [r[0] for r in rows]

    # inserts ---------------------------------------------------------------------------------------
    def reserve(self, n: int, not_before: float, commit_by: float | None = None) -> list[int]:
        """`n` new entry ids, never handed out again, each in vector_cleanup until `not_before` (the
        insert that took them writes their vectors, then commits them or gives them up)."""
        with self._transaction(commit_by) as db:
            row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'entries'").fetchone()
            top = max(row[0] if row else 0, db.execute("SELECT MAX(id) FROM vector_cleanup").fetchone()[0] or 0)
            if row:
                db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'entries'", (top + n,))
            else:
                db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('entries', ?)", (top + n,))
            ids = list(range(top + 1, top + n + 1))
            db.executemany("INSERT INTO vector_cleanup (id, not_before) VALUES (?, ?)", [(i, not_before) for i in ids])
        return ids

    def commit_insert(
        self,
        scope: str,
        model: str,
        tenant: str,
        items: Sequence[NewEntry],
        vector_ids: dict[int, int],
        now: float,
        quotas: Quotas,
        commit_by: float | None = None,
    ) -> Committed:
        """Store `items` in one transaction: an item whose question and answer the scope already holds
        refreshes that entry (no second one); another takes its id from `vector_ids` (position -> an id
        from `reserve` whose vector Milvus has). Then evicts over `quotas` and commits before `commit_by`.
        Raises TooLate (past `commit_by`, or its reserved ids were reclaimed) or Changed (an item without
        a vector is no longer stored); either way nothing is written."""
        reserved = list(vector_ids.values())
        out = Committed()
        with self._transaction(commit_by) as db:
            held = sum(
                db.execute(f"SELECT COUNT(*) FROM vector_cleanup WHERE id IN ({_marks(len(c))})", tuple(c)).fetchone()[0]
                for c in _chunks(reserved)
            )
            if held != len(reserved):  # reclaimed: only after their not_before, which is past the deadline
                raise TooLate("the insert's reserved ids were reclaimed (its deadline passed)")
            used: list[int] = []
            unused: list[int] = []
            missing: list[int] = []
            for i, e in enumerate(items):
                existing = _stored(db, scope, e.exact_key, e.answer)
                if existing is not None:
                    db.execute(
                        "UPDATE entries SET created = ?, last_access = MAX(last_access, ?) WHERE id = ?",
                        (now, now, existing),
                    )
                    out.ids.append(existing)
                    out.refreshed += 1
                    if i in vector_ids:
                        unused.append(vector_ids[i])  # stored meanwhile by another insert: its vector goes
                elif i in vector_ids:
                    db.execute(
                        "INSERT INTO entries (id, scope, model, tenant, exact_key, query, answer, created, last_access) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (vector_ids[i], scope, model, tenant, e.exact_key, e.query, e.answer, now, now),
                    )
                    out.ids.append(vector_ids[i])
                    used.append(vector_ids[i])
                    out.added += 1
                else:
                    missing.append(i)
            if missing:
                raise Changed(missing)
            for chunk in _chunks(used):
                db.execute(f"DELETE FROM vector_cleanup WHERE id IN ({_marks(len(chunk))})", tuple(chunk))
            for chunk in _chunks(unused):
                db.execute(f"UPDATE vector_cleanup SET not_before = 0 WHERE id IN ({_marks(len(chunk))})", tuple(chunk))
            out.evicted = _evict(db, scope, tenant, quotas)
            out.entries = _count(db, None)
        return out

    def release(self, ids: Sequence[int]) -> None:
        """Give reserved ids up (the insert failed): their vectors may go at once."""
        with self._transaction() as db:
            for chunk in _chunks(ids):
                db.execute(f"UPDATE vector_cleanup SET not_before = 0 WHERE id IN ({_marks(len(chunk))})", tuple(chunk))

    # removals --------------------------------------------------------------------------------------
    def remove(self, scope: str, ids: Sequence[int], truncate: bool = False, commit_by: float | None = None) -> int:
        """Remove the entries of `ids` of `scope` (every entry of it with `truncate`); their vectors go
        to vector_cleanup. The number removed."""
        with self._transaction(commit_by) as db:
            if truncate:
                mine = [r[0] for r in db.execute("SELECT id FROM entries WHERE scope = ?", (scope,))]
            else:
                mine = _ids_of(db, scope, ids)
            return _delete(db, mine)

    def expire(self, before: float, limit: int = 5000) -> int:
        """Remove up to `limit` entries created before `before` (TTL); the number removed."""
        with self._transaction() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM entries WHERE created < ? LIMIT ?", (before, limit))]
            return _delete(db, ids)

    def delete(self, ids: Iterable[int]) -> int:
        with self._transaction() as db:
            return _delete(db, list(ids))

    # vector cleanup --------------------------------------------------------------------------------
    def reclaimable(self, now: float, limit: int = 1000) -> list[int]:
        """Ids in vector_cleanup, due at `now`, whose entry does not exist: their vectors may be deleted."""
        with self._connection() as db:
            rows = db.execute(
                "SELECT c.id FROM vector_cleanup c WHERE c.not_before <= ? "
                "AND NOT EXISTS (SELECT 1 FROM entries e WHERE e.id = c.id) ORDER BY c.not_before LIMIT ?",
                (now, limit),
            ).fetchall()
        return [r[0] for r in rows]

    def forget(self, ids: Sequence[int], now: float) -> None:
        """Their vectors are deleted: drop the ids from vector_cleanup (those still due at `now`)."""
        with self._transaction() as db:
            for chunk in _chunks(ids):
                db.execute(
                    f"DELETE FROM vector_cleanup WHERE id IN ({_marks(len(chunk))}) AND not_before <= ?", (*chunk, now)
                )

    def cleanup_pending(self) -> int:
        """Ids whose vectors may still be in Milvus without an entry (due or not)."""
        with self._connection() as db:
            return db.execute("SELECT COUNT(*) FROM vector_cleanup").fetchone()[0]

    # hits and the hit log --------------------------------------------------------------------------
    def touch(self, accesses: dict[int, tuple[float, int]]) -> None:
        """Record hits: entry id -> (last access time, hits since the last call)."""
        if accesses:
            with self._transaction() as db:
                db.executemany(
                    "UPDATE entries SET last_access = MAX(last_access, ?), hits = hits + ? WHERE id = ?",
                    [(at, n, i) for i, (at, n) in accesses.items()],
                )

    def log(self, records: Sequence[LogRecord], keep: int) -> None:
        if not records:
            return
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO hit_log (time, scope, model, query, hit, exact, similarity, entry_id, latency_ms, verdict, "
                "verify_score) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(r.time, r.scope, r.model, r.query, int(r.hit), int(r.exact), r.similarity, r.entry_id, r.latency_ms,
                  r.verdict, r.verify_score) for r in records],
            )
            last = db.execute("SELECT MAX(id) FROM hit_log").fetchone()[0] or 0
            if last > keep:
                db.execute("DELETE FROM hit_log WHERE id <= ?", (last - keep,))

    def recent_log(self, scope: str, limit: int) -> list[LogRecord]:
        with self._connection() as db:
            rows = db.execute(
                "SELECT time, scope, model, query, hit, exact, similarity, entry_id, latency_ms, verdict, verify_score "
                "FROM hit_log WHERE scope = ? ORDER BY id DESC LIMIT ?",
                (scope, limit),
            ).fetchall()
        return [LogRecord(r[0], r[1], r[2], r[3], bool(r[4]), bool(r[5]), r[6], r[7], r[8], r[9], r[10]) for r in rows]


# statements inside a caller's connection ---------------------------------------------------------------
def _add_columns(db: sqlite3.Connection, table: str, columns: dict[str, str]) -> None:
    """ALTER TABLE ADD COLUMN for each of `columns` the table lacks (SQLite has no ADD COLUMN IF NOT EXISTS)."""
    have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
    for name, decl in columns.items():
        if name not in have:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")


def _stored(db: sqlite3.Connection, scope: str, exact_key: str, answer: str) -> int | None:
    row = db.execute(
        "SELECT id FROM entries WHERE scope = ? AND exact_key = ? AND answer = ? ORDER BY id DESC LIMIT 1",
        (scope, exact_key, answer),
    ).fetchone()
    return row[0] if row else None


def _count(db: sqlite3.Connection, scope: str | None) -> int:
    if scope is None:
        return db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
    return db.execute("SELECT COUNT(*) FROM entries WHERE scope = ?", (scope,)).fetchone()[0]


def _count_tenant(db: sqlite3.Connection, tenant: str) -> int:
    return db.execute("SELECT COUNT(*) FROM entries WHERE tenant = ?", (tenant,)).fetchone()[0]


def _ids_of(db: sqlite3.Connection, scope: str, ids: Sequence[int]) -> list[int]:
    found: list[int] = []
    for chunk in _chunks(ids):
        found += [r[0] for r in db.execute(
            f"SELECT id FROM entries WHERE {BY_ID_ONLY}scope = ? AND id IN ({_marks(len(chunk))})", (scope, *chunk)
        )]
    return found


def _least_recent(db: sqlite3.Connection, column: str, value: str, over: int) -> list[int]:
    if over <= 0:
        return []
    assert column in ("scope", "tenant")  # a column name, never input
    rows = db.execute(
        f"SELECT id FROM entries WHERE {column} = ? ORDER BY last_access, id LIMIT ?", (value, over)
    ).fetchall()
    return [r[0] for r in rows]


def _delete(db: sqlite3.Connection, ids: Sequence[int]) -> int:
    """Delete entries; their ids go to vector_cleanup (due at once) for their vectors."""
    removed = 0
    for chunk in _chunks(ids):
        removed += db.execute(f"DELETE FROM entries WHERE id IN ({_marks(len(chunk))})", tuple(chunk)).rowcount
        db.executemany("INSERT OR REPLACE INTO vector_cleanup (id, not_before) VALUES (?, 0)", [(i,) for i in chunk])
    return removed


def _evict(db: sqlite3.Connection, scope: str, tenant: str, quotas: Quotas) -> dict[str, list[int]]:
    """Inside an insert's transaction: the least recently used entries of `tenant` (the inserter) over
    the quotas go, never another tenant's. reason -> ids evicted."""
    evicted: dict[str, list[int]] = {}
    over = _count(db, scope) - quotas.per_scope
    if over > 0:
        evicted["max_entries_per_scope"] = ids = _least_recent(db, "scope", scope, over)
        _delete(db, ids)
    if tenant:
        over = _count_tenant(db, tenant) - quotas.per_tenant
        if over > 0:
            evicted["max_entries_per_tenant"] = ids = _least_recent(db, "tenant", tenant, over)
            _delete(db, ids)
    over = _count(db, None) - quotas.overall
    if over > 0:  # the store is full: the inserter makes room among its own entries
        evicted["max_entries"] = ids = _least_recent(db, "tenant", tenant, over)
        _delete(db, ids)
    return evicted
