"""The cache's scalar store: entries (query text, answer, scope, times) and the hit log, in SQLite.

Plain logic, blocking calls: the service runs them on one thread (SQLite connections are not shared
across threads). The vectors live in Milvus under the same ids (vectors.py); an entry exists when both
have it, and an insert writes SQLite inside a transaction that is committed only after Milvus took the
vectors (semantic.py), so a failure leaves neither half.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

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
    latency_ms REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS hit_log_scope ON hit_log (scope, id);
"""


@dataclass(frozen=True, slots=True)
class Entry:
    id: int
    query: str
    answer: str
    created: float
    last_access: float


@dataclass(frozen=True, slots=True)
class NewEntry:
    exact_key: str
    query: str
    answer: str


@dataclass(frozen=True, slots=True)
class LogRecord:
    time: float
    scope: str
    model: str
    query: str
    hit: bool
    exact: bool
    similarity: float
    entry_id: int
    latency_ms: float


class EntryStore:
    def __init__(self, path: str | Path) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # reads -----------------------------------------------------------------------------------------
    def exact(self, scope: str, exact_key: str, not_before: float) -> Entry | None:
        row = self.db.execute(
            "SELECT id, query, answer, created, last_access FROM entries WHERE scope = ? AND exact_key = ? "
            "AND created >= ? ORDER BY id DESC LIMIT 1",
            (scope, exact_key, not_before),
        ).fetchone()
        return Entry(*row) if row else None

    def get(self, scope: str, ids: Sequence[int], not_before: float) -> dict[int, Entry]:
        """The entries of `ids` that belong to `scope` and were created at or after `not_before`."""
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.db.execute(
            f"SELECT id, query, answer, created, last_access FROM entries WHERE id IN ({marks}) AND scope = ? "
            "AND created >= ?",
            (*ids, scope, not_before),
        ).fetchall()
        return {r[0]: Entry(*r) for r in rows}

    def count(self, scope: str | None = None) -> int:
        if scope is None:
            return self.db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM entries WHERE scope = ?", (scope,)).fetchone()[0]

    def count_tenant(self, tenant: str) -> int:
        """Entries of one tenant, in all its scopes (models)."""
        return self.db.execute("SELECT COUNT(*) FROM entries WHERE tenant = ?", (tenant,)).fetchone()[0]

    def ids_of(self, scope: str, ids: Sequence[int]) -> list[int]:
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        rows = self.db.execute(f"SELECT id FROM entries WHERE scope = ? AND id IN ({marks})", (scope, *ids)).fetchall()
        return [r[0] for r in rows]

    def scope_ids(self, scope: str) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT id FROM entries WHERE scope = ?", (scope,))]

    # writes ----------------------------------------------------------------------------------------
    def begin_insert(self, scope: str, model: str, tenant: str, new: Sequence[NewEntry], now: float) -> list[int]:
        """Insert inside an open transaction; `commit()` or `rollback()` ends it."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            ids = []
            for e in new:
                cur = self.db.execute(
                    "INSERT INTO entries (scope, model, tenant, exact_key, query, answer, created, last_access) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (scope, model, tenant, e.exact_key, e.query, e.answer, now, now),
                )
                assert cur.lastrowid is not None  # an INSERT sets it
                ids.append(cur.lastrowid)
            return ids
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def commit(self) -> None:
        self.db.execute("COMMIT")

    def rollback(self) -> None:
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")

    def touch(self, accesses: dict[int, tuple[float, int]]) -> None:
        """Record hits: entry id -> (last access time, hits since the last call)."""
        if accesses:
            self.db.executemany(
                "UPDATE entries SET last_access = MAX(last_access, ?), hits = hits + ? WHERE id = ?",
                [(at, n, i) for i, (at, n) in accesses.items()],
            )

    def delete(self, ids: Iterable[int]) -> int:
        ids = list(ids)
        removed = 0
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            cur = self.db.execute(f"DELETE FROM entries WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            removed += cur.rowcount
        return removed

    def least_recent(self, scope: str, over: int) -> list[int]:
        """The `over` least recently used entries of `scope` (eviction by max entries per scope)."""
        if over <= 0:
            return []
        rows = self.db.execute(
            "SELECT id FROM entries WHERE scope = ? ORDER BY last_access, id LIMIT ?", (scope, over)
        ).fetchall()
        return [r[0] for r in rows]

    def least_recent_of_tenant(self, tenant: str, over: int) -> list[int]:
        """The `over` least recently used entries of one tenant, in all its scopes (per-tenant eviction:
        a tenant's inserts only ever evict its own entries)."""
        if over <= 0:
            return []
        rows = self.db.execute(
            "SELECT id FROM entries WHERE tenant = ? ORDER BY last_access, id LIMIT ?", (tenant, over)
        ).fetchall()
        return [r[0] for r in rows]

    def least_recent_overall(self, over: int) -> list[tuple[int, str]]:
        if over <= 0:
            return []
        rows = self.db.execute("SELECT id, scope FROM entries ORDER BY last_access, id LIMIT ?", (over,)).fetchall()
        return [(r[0], r[1]) for r in rows]

    def expired(self, before: float, limit: int = 5000) -> list[int]:
        rows = self.db.execute("SELECT id FROM entries WHERE created < ? LIMIT ?", (before, limit)).fetchall()
        return [r[0] for r in rows]

    # hit log ---------------------------------------------------------------------------------------
    def log(self, records: Sequence[LogRecord], keep: int) -> None:
        if not records:
            return
        self.db.executemany(
            "INSERT INTO hit_log (time, scope, model, query, hit, exact, similarity, entry_id, latency_ms) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(r.time, r.scope, r.model, r.query, int(r.hit), int(r.exact), r.similarity, r.entry_id, r.latency_ms)
             for r in records],
        )
        last = self.db.execute("SELECT MAX(id) FROM hit_log").fetchone()[0] or 0
        if last > keep:
            self.db.execute("DELETE FROM hit_log WHERE id <= ?", (last - keep,))

    def recent_log(self, scope: str, limit: int) -> list[LogRecord]:
        rows = self.db.execute(
            "SELECT time, scope, model, query, hit, exact, similarity, entry_id, latency_ms FROM hit_log "
            "WHERE scope = ? ORDER BY id DESC LIMIT ?",
            (scope, limit),
        ).fetchall()
        return [LogRecord(r[0], r[1], r[2], r[3], bool(r[4]), bool(r[5]), r[6], r[7], r[8]) for r in rows]
