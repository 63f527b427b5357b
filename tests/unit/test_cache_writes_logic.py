"""The cache's write path (issue 16, deliver 4) in its SQLite store, real SQLite in a temp dir, no network:
an insert's reserved ids, its one transaction (deadline, retries, eviction inside it), the vectors left to
clean up, and writes that a cancelled caller cannot leave half done. The same findings on Milvus, the
embedding model and the cache service behind the gateway: tests/integration/test_cache_writes.py."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from unimodel.cache.entries import Changed, Committed, EntryStore, NewEntry, Quotas, TooLate
from unimodel.cache.querytext import Turn, query_text
from unimodel.cache.semantic import Limits, Scope, SemanticCache
from unimodel.cache.settings import CacheSettings
from unimodel.cache.vectors import VectorIndex
from unimodel.core import errors


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "cache.sqlite"


@pytest.fixture
def store(path: Path) -> Iterator[EntryStore]:
    s = EntryStore(path)
    yield s
    s.close()


def new(text: str, answer: str = "a") -> NewEntry:
    t = query_text([Turn("user", text)])
    return NewEntry(t.exact_key, t.spliced, answer)


def lock(path: Path) -> sqlite3.Connection:
    """Another connection holds SQLite's write lock until its rollback."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    return db


def rows(path: Path, sql: str, *args: object) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


DEFAULT_QUOTAS = Quotas()


def insert(
    store: EntryStore, items: list[NewEntry], now: float = 10.0, quotas: Quotas = DEFAULT_QUOTAS, scope: str = "s"
) -> Committed:
    """An insert's two SQLite steps (its vectors would go to Milvus in between)."""
    ids = store.reserve(len(items), not_before=time.time() + 60)
    return store.commit_insert(scope, "m", "", items, dict(enumerate(ids)), now, quotas)


def test_finding_retried_insert_creates_a_duplicate(store: EntryStore, path: Path) -> None:
    first = insert(store, [new("How far is the Moon?", "far")], now=10.0)
    again = insert(store, [new("how far is the moon", "far")], now=20.0)  # the retry, its own vector written
    assert again.ids == first.ids and (again.added, again.refreshed) == (0, 1)
    assert rows(path, "SELECT created, last_access FROM entries") == [(20.0, 20.0)]
    assert store.count() == 1
    # the retry's reserved id holds a vector nobody needs: it is due for cleanup now
    assert store.reclaimable(time.time()) == [first.ids[0] + 1]
    # an item known to be stored goes without a vector; if it went away meanwhile, nothing is written
    store.delete(first.ids)
    with pytest.raises(Changed) as changed:
        store.commit_insert("s", "m", "", [new("How far is the Moon?", "far")], {}, 30.0, Quotas())
    assert changed.value.positions == [0] and store.count() == 0


def test_finding_rolled_back_ids_are_reused(store: EntryStore) -> None:
    """SQLite's AUTOINCREMENT hands a rolled back id out again; Milvus may hold a vector under it already
    (written before the failed commit), which would then stand for another question. Reserved ids are
    committed apart from the entries: never handed out twice."""
    ids = store.reserve(2, not_before=time.time() + 60)
    with pytest.raises(TooLate):
        store.commit_insert("s", "m", "", [new("q1"), new("q2")], dict(enumerate(ids)), 10.0, Quotas(), commit_by=1.0)
    store.release(ids)
    later = insert(store, [new("q3")])
    assert later.ids[0] > max(ids)
    assert sorted(store.reclaimable(time.time())) == ids  # their vectors go


def test_finding_insert_commits_after_its_deadline(store: EntryStore, path: Path) -> None:
    """The write waits for the store (another connection holds the lock) until its commit deadline, then
    gives up with nothing written; its reserved ids wait for their grace before their vectors go."""
    not_before = time.time() + 60
    ids = store.reserve(1, not_before=not_before)
    blocker = lock(path)
    started = time.monotonic()
    try:
        with pytest.raises(TooLate):
            store.commit_insert("s", "m", "", [new("q")], {0: ids[0]}, 10.0, Quotas(), commit_by=time.time() + 0.3)
    finally:
        blocker.rollback()
        blocker.close()
    assert 0.2 < time.monotonic() - started < 2.0
    assert store.count() == 0
    assert store.reclaimable(time.time()) == []  # the insert might still write them until its deadline
    assert store.reclaimable(not_before) == ids
    with pytest.raises(TooLate):  # a deadline already past: nothing starts
        store.reserve(1, not_before=not_before, commit_by=time.time() - 1)


def test_finding_eviction_after_commit_fails_a_stored_insert(store: EntryStore, path: Path) -> None:
    """Eviction runs inside the insert's transaction: when it fails, the insert is not stored either;
    when it works, the evicted entries' vectors are listed for the cleanup in the same transaction."""
    one = Quotas(per_scope=1)
    [kept] = insert(store, [new("first")], now=1.0, quotas=one).ids
    rows(path, "CREATE TRIGGER no_delete BEFORE DELETE ON entries BEGIN SELECT RAISE(ABORT, 'refused'); END")
    with pytest.raises(sqlite3.IntegrityError, match="refused"):
        insert(store, [new("second")], now=2.0, quotas=one)
    assert rows(path, "SELECT id FROM entries") == [(kept,)]
    rows(path, "DROP TRIGGER no_delete")
    done = insert(store, [new("second")], now=3.0, quotas=one)
    assert done.evicted == {"max_entries_per_scope": [kept]} and done.entries == 1
    assert kept in store.reclaimable(time.time())
    store.forget([kept], time.time())
    assert kept not in store.reclaimable(time.time())


def test_finding_cancelled_insert_leaves_a_transaction_open(store: EntryStore, path: Path) -> None:
    """A write whose caller is cancelled while it waits for the lock still ends its own transaction (it
    runs whole on its thread); the store's connections are never left inside one, and the next writes of
    other requests commit on their own."""
    ids = insert(store, [new("kept")]).ids

    async def go() -> None:
        blocker = lock(path)
        task = asyncio.ensure_future(asyncio.to_thread(store.reserve, 1, time.time() + 60))
        await asyncio.sleep(0.2)
        task.cancel()
        blocker.rollback()
        blocker.close()
        await asyncio.sleep(0.3)
        store.touch({ids[0]: (50.0, 2)})

    asyncio.run(go())
    assert rows(path, "SELECT hits FROM entries") == [(2,)]  # the other request's write: committed
    assert all(not db.in_transaction for db in store._idle)
    assert insert(store, [new("next")]).added == 1


def test_a_cancelled_write_answers_what_it_did(path: Path) -> None:
    """A removal (or an insert's commit) cancelled while it runs finishes, and answers its outcome instead
    of the cancellation: a caller told "failed" must not find its entries gone (or stored)."""
    store = EntryStore(path)
    cache = SemanticCache(store, VectorIndex(str(path.parent / "unused.db"), "c", 4), _never, Limits())
    try:
        ids = insert(store, [new("to remove")], scope=Scope("m").key).ids

        async def go() -> int:
            blocker = lock(path)
            task = asyncio.create_task(cache.remove(Scope("m"), ids=ids, deadline=time.time() + 30))
            await asyncio.sleep(0.2)
            task.cancel()
            await asyncio.sleep(0.1)
            blocker.rollback()
            blocker.close()
            return await task

        assert asyncio.run(go()) == 1 and store.count() == 0
        assert store.reclaimable(time.time()) == ids  # its vector goes by the cleanup
    finally:
        cache.close()
        store.close()


def test_writes_past_their_deadline_start_nothing(path: Path) -> None:
    store = EntryStore(path)
    cache = SemanticCache(store, VectorIndex(str(path.parent / "unused.db"), "c", 4), _never, Limits(reply_margin_s=0.5))
    try:
        async def go() -> None:
            turns = [Turn("user", "q")]
            with pytest.raises(errors.DeadlineExceeded, match="nothing was written"):
                await cache.insert(Scope("m"), [(turns, "a")], deadline=time.time() + 0.4)  # within the margin
            with pytest.raises(errors.DeadlineExceeded):
                await cache.remove(Scope("m"), truncate=True, deadline=time.time() + 0.1)

        asyncio.run(go())
        assert store.count() == 0 and store.cleanup_pending() == 0
    finally:
        cache.close()
        store.close()


def test_write_settings() -> None:
    s = CacheSettings()
    assert s.reply_margin_s == 0.5 and s.sqlite_busy_timeout_s == 5.0
    with pytest.raises(ValueError, match="needs a file"):
        EntryStore(":memory:")


async def _never(texts: object) -> np.ndarray:
    raise AssertionError("no embedding expected")
