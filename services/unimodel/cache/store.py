"""The cache's scalar store, as the semantic cache sees it: entries (query text, answer, scope, times), the
hit log, and the ids whose vectors Milvus may hold without an entry (`vector_cleanup`).

Two implementations behind one async interface (`ScalarStore`):
  - store_sqlite.SqliteStore: the embedded default (`unimodel up`, one replica), entries.EntryStore's
    blocking calls run on a few threads;
  - store_postgres.PostgresStore: PostgreSQL through asyncpg (a pool), shared by any number of cache
    replicas (compose, Kubernetes).

Every method is one whole unit of work: it begins and ends its own transaction, so nothing is left open
when a caller is cancelled, and a write raises (nothing written) or returns (committed). The contract the
cache relies on, the same in both (tests/integration/test_cache_replicas.py runs one conformance suite on
both):
  - ids handed out by `reserve` are never handed out again (not after a rollback, not by another replica);
  - an entry is unique per (scope, exact key, answer): an insert of one that is stored refreshes it (a
    retried or concurrent insert adds nothing);
  - an insert's eviction (LRU over the quotas) runs in the insert's transaction: both or neither;
  - writes given `commit_by` (time.time()) commit before it or raise TooLate having written nothing;
  - `exact` and `get` see every committed entry at once, whichever replica committed it.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


class TooLate(Exception):
    """The write could not commit before its deadline: it was rolled back, nothing was written."""


class Changed(Exception):
    """An entry the insert meant to refresh went away meanwhile (evicted, expired, removed): rolled back,
    nothing written; `positions` are the items without a vector (plan again)."""

    def __init__(self, positions: list[int]) -> None:
        super().__init__(f"{len(positions)} entries went away during the insert")
        self.positions = positions


class StoreUnavailable(Exception):
    """The store cannot be reached or refused the call (the message says which); nothing was written."""


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
class Quotas:
    """Entries kept before LRU eviction of the inserting tenant's own entries (semantic.py explains)."""

    per_scope: int = 200_000
    per_tenant: int = 200_000  # named tenants; "" (open mode, admins) is bounded by `overall` only
    overall: int = 2_000_000


@dataclass(slots=True)
class Committed:
    ids: list[int] = field(default_factory=list)  # per item given, its entry id (new or already stored)
    added: int = 0  # new entries
    refreshed: int = 0  # entries that were already stored (a retry): created and last access set to now
    evicted: dict[str, list[int]] = field(default_factory=dict)  # reason -> entry ids
    entries: int = 0  # entries in all scopes afterwards


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
    verdict: int = 0  # unimodel.v1.CacheVerdict: 0 the verification stage did not run, 1 accepted, 2 rejected
    verify_score: float = 0.0  # its probability that query and entry ask the same question


Accesses = Mapping[int, tuple[float, int]]
"""Hits to record: entry id -> (last access time, hits since the last flush)."""


class ScalarStore(abc.ABC):
    """The scalar half of the cache (the vectors are in Milvus: vectors.py). Async; see the module doc."""

    kind: str = ""
    """What it is, for logs and status: "sqlite" or "postgresql"."""

    async def start(self) -> None:  # noqa: B027  (optional hook: the SQLite store needs none)
        """Connect and create the schema (idempotent, safe when replicas start together)."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def describe(self) -> str:
        """Where it is, without secrets (for logs)."""

    # reads
    @abc.abstractmethod
    async def exact(self, scope: str, exact_key: str, not_before: float) -> Entry | None:
        """The newest entry of `scope` under `exact_key` created at or after `not_before`."""

    @abc.abstractmethod
    async def get(self, scope: str, ids: Sequence[int], not_before: float) -> dict[int, Entry]:
        """The entries of `ids` that belong to `scope` and were created at or after `not_before`."""

    @abc.abstractmethod
    async def stored(self, scope: str, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """(exact key, answer) -> id of the entry of `scope` that already holds that question and answer."""

    @abc.abstractmethod
    async def count(self, scope: str | None = None) -> int: ...

    @abc.abstractmethod
    async def count_tenant(self, tenant: str) -> int: ...

    @abc.abstractmethod
    async def least_recent(self, scope: str, over: int) -> list[int]:
        """The `over` least recently used entries of `scope`."""

    # inserts
    @abc.abstractmethod
    async def reserve(self, n: int, not_before: float, commit_by: float | None = None) -> list[int]:
        """`n` new entry ids, never handed out again, each in vector_cleanup until `not_before`."""

    @abc.abstractmethod
    async def commit_insert(
        self, scope: str, model: str, tenant: str, items: Sequence[NewEntry], vector_ids: dict[int, int],
        now: float, quotas: Quotas, commit_by: float | None = None,
    ) -> Committed:
        """Store `items` in one transaction (entries.EntryStore.commit_insert tells the rules)."""

    @abc.abstractmethod
    async def release(self, ids: Sequence[int]) -> None:
        """Give reserved ids up (the insert failed): their vectors may go at once."""

    # removals
    @abc.abstractmethod
    async def remove(self, scope: str, ids: Sequence[int], truncate: bool = False, commit_by: float | None = None) -> int:
        """Remove entries of `scope` (all with `truncate`); their ids go to vector_cleanup. The number removed."""

    @abc.abstractmethod
    async def expire(self, before: float, limit: int = 5000) -> int:
        """Remove up to `limit` entries created before `before` (TTL); the number removed."""

    @abc.abstractmethod
    async def delete(self, ids: Sequence[int]) -> int: ...

    # vector cleanup
    @abc.abstractmethod
    async def reclaimable(self, now: float, limit: int = 1000) -> list[int]:
        """Ids in vector_cleanup, due at `now`, without an entry: their vectors may be deleted."""

    @abc.abstractmethod
    async def forget(self, ids: Sequence[int], now: float) -> None:
        """Their vectors are deleted: drop the ids from vector_cleanup (those still due at `now`)."""

    @abc.abstractmethod
    async def cleanup_pending(self) -> int: ...

    # hits and the hit log
    @abc.abstractmethod
    async def touch(self, accesses: Accesses) -> None:
        """Record hits (LRU order): entry id -> (last access time, hits since the last call)."""

    @abc.abstractmethod
    async def log(self, records: Sequence[LogRecord], keep: int) -> None:
        """Append hit log rows in one statement; keep the newest `keep`."""

    @abc.abstractmethod
    async def recent_log(self, scope: str, limit: int) -> list[LogRecord]: ...
