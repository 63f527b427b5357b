"""The cache's pluggable scalar store, without a network (issue 17, deliver 1): the settings that pick it,
the hit buffer that batches LRU times and hit log rows, the SQLite store behind the async interface and the
PostgreSQL store's plain helpers. The PostgreSQL store itself, on a real server, and cache replicas sharing
it: tests/integration/test_cache_replicas.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from unimodel.cache.hits import HitBuffer
from unimodel.cache.querytext import Turn, query_text
from unimodel.cache.service import open_store
from unimodel.cache.settings import CacheSettings
from unimodel.cache.store import LogRecord, NewEntry, Quotas
from unimodel.cache.store_postgres import PostgresStore, answer_key, redacted
from unimodel.cache.store_sqlite import SqliteStore


def record(i: int, scope: str = "s") -> LogRecord:
    return LogRecord(float(i), scope, "m", f"q{i}", i % 2 == 0, False, 0.9, i, 1.0)


def new(text: str, answer: str = "a") -> NewEntry:
    t = query_text([Turn("user", text)])
    return NewEntry(t.exact_key, t.spliced, answer)


# settings ---------------------------------------------------------------------------------------------
def test_store_settings_pick_the_store(tmp_path: Path) -> None:
    s = CacheSettings(data_dir=str(tmp_path))
    assert s.store_url == "" and s.flush_interval_s == 0.5 and s.flush_rows == 1000 and s.store_pool_size == 10
    store = open_store(s)
    assert isinstance(store, SqliteStore) and store.describe() == f"SQLite {tmp_path / 'cache.sqlite'}"
    asyncio.run(store.close())
    secret = tmp_path / "pg-password"
    secret.write_text("s3cret\n")
    pg = CacheSettings(store_url="postgresql://cache@db:5432/unimodel", store_password_file=str(secret), store_pool_size=3)
    made = open_store(pg)
    assert isinstance(made, PostgresStore) and made.password == "s3cret" and made.pool_size == 3
    assert made.describe() == "PostgreSQL postgresql://cache@db:5432/unimodel"


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"store_url": "mysql://db/x"}, "store_url must be postgresql://"),
        ({"store_url": "postgresql:///nohost"}, "store_url must be postgresql://"),
        ({"store_url": "postgresql://u:pw@db/x"}, "store_password_file instead"),
        ({"store_url": "postgresql://u@db/x", "store_password": "a", "store_password_file": "/f"}, "both set"),
        ({"store_password": "a"}, "store_password needs store_url"),
        ({"store_pool_size": 0}, "store_pool_size"),
        ({"flush_rows": 0}, "flush_rows"),
    ],
)
def test_store_settings_refuse_what_cannot_work(fields: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        CacheSettings(**fields)  # type: ignore[arg-type]  # fields: settings by keyword, typed object here


def test_postgres_helpers() -> None:
    assert answer_key("x") == answer_key("x") != answer_key("y") and len(answer_key("a" * 300_000)) == 32
    assert redacted("postgresql://u:secret@h:5/d") == "postgresql://u@h:5/d"
    assert redacted("postgresql://u@h/d") == "postgresql://u@h/d"


# the hit buffer ---------------------------------------------------------------------------------------
def test_hit_buffer_batches_and_merges() -> None:
    buf = HitBuffer(flush_rows=3, max_rows=10)
    buf.add(record(1), 7, at=5.0)
    buf.add(record(2), 7, at=4.0)
    assert not buf.due and len(buf) == 2
    buf.add(record(3))
    assert buf.due
    batch = buf.take()
    assert batch.touches == {7: (5.0, 2)} and [r.query for r in batch.records] == ["q1", "q2", "q3"]
    assert not buf.take() and len(buf) == 0
    buf.add(record(4), 7, at=9.0)
    buf.put_back(batch)  # refused by the store: back in front, hits merged
    again = buf.take()
    assert again.touches == {7: (9.0, 3)} and [r.query for r in again.records] == ["q1", "q2", "q3", "q4"]


def test_hit_buffer_is_bounded() -> None:
    buf = HitBuffer(flush_rows=100, max_rows=5)
    for i in range(8):
        buf.add(record(i))
    assert len(buf) == 5 and buf.dropped == 3
    batch = buf.take()
    assert [r.query for r in batch.records] == ["q3", "q4", "q5", "q6", "q7"]
    buf.add(record(8))
    buf.put_back(batch)
    assert len(buf) == 5 and buf.dropped == 4 and buf.take().records[-1].query == "q8"


# the SQLite store behind the async interface ------------------------------------------------------------
def test_sqlite_store_through_the_interface(tmp_path: Path) -> None:
    async def go() -> None:
        store = open_store(CacheSettings(data_dir=str(tmp_path)))
        await store.start()
        try:
            ids = await store.reserve(2, time.time() + 60)
            done = await store.commit_insert("s", "m", "", [new("q1"), new("q2")], dict(enumerate(ids)), 10.0, Quotas())
            assert done.ids == ids and done.added == 2 and await store.count("s") == 2
            again = await store.reserve(1, time.time() + 60)
            retry = await store.commit_insert("s", "m", "", [new("Q1 ")], {0: again[0]}, 11.0, Quotas())
            assert retry.ids == [ids[0]] and (retry.added, retry.refreshed) == (0, 1)
            await store.touch({ids[0]: (50.0, 2)})
            assert await store.least_recent("s", 1) == [ids[1]]
            await store.log([record(i) for i in range(3)], keep=2)
            assert [r.query for r in await store.recent_log("s", 10)] == ["q2", "q1"]
            assert await store.reclaimable(time.time()) == again  # the retry's vector goes
        finally:
            await store.close()

    asyncio.run(go())
