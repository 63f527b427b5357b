"""Cache writes are exactly what the client was told (issue 16, deliver 4), on real components: SQLite,
Milvus Lite, all-MiniLM-L6-v2 with onnxruntime; the last test runs the cache service behind the gateway
over nats-server and etcd, with the embedding model on an embedding-worker.

Each test reproduces a finding of 2026-12-06 and fails on the code before the fix:
- a cancelled insert left its SQLite transaction open on the connection every request shared: the next
  writes ran inside it and a later ROLLBACK undid them (another request's insert failed, hits were lost);
- eviction ran after the commit, so its failure answered an error for an insert that was stored;
- a retried insert (same question and answer) stored a second entry;
- the cache ignored the request's deadline: the gateway answered an error after 30 s, the cache committed
  anyway, and the client's retry stored a duplicate.

The faults are real: another SQLite connection holding the write lock (what a backup, a second process or
a slow disk does), a trigger refusing a DELETE (a store that fails mid-transaction), Milvus unreachable.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from helpers.minilm import Clock, Embedder
from helpers.support import Infra, Services
from unimodel.cache.entries import EntryStore
from unimodel.cache.querytext import Turn, query_text
from unimodel.cache.semantic import Limits, Scope, SemanticCache
from unimodel.cache.vectors import VectorIndex
from unimodel.core import errors
from unimodel.local.procs import MilvusLiteServer, free_port, http_ok, wait_until

pytestmark = pytest.mark.timeout(240)

EMBEDDER = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def embedder(model_repository: Path) -> Embedder:
    return Embedder(model_repository / EMBEDDER)


class Made:
    def __init__(self, cache: SemanticCache, clock: Clock, sqlite_file: Path) -> None:
        self.cache, self.clock, self.sqlite_file = cache, clock, sqlite_file

    def rows(self, sql: str, *args: object) -> list[tuple]:
        """Read the store as any other process would: a connection of our own."""
        db = sqlite3.connect(self.sqlite_file)
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def lock(self) -> sqlite3.Connection:
        """Another connection takes SQLite's write lock (until its rollback)."""
        db = sqlite3.connect(self.sqlite_file, isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        return db


@pytest.fixture
def make(tmp_path: Path, embedder: Embedder) -> Iterator:
    made: list[SemanticCache] = []

    def build(**limits: object) -> Made:
        clock = Clock()
        sqlite_file = tmp_path / f"c{len(made)}.sqlite"
        vectors = VectorIndex(str(tmp_path / "milvus.db"), f"w{len(made)}", 384)
        cache = SemanticCache(EntryStore(sqlite_file), vectors, embedder, Limits(**limits), clock=clock)  # type: ignore[arg-type]  # limits: Limits fields by keyword, typed object here
        made.append(cache)
        return Made(cache, clock, sqlite_file)

    yield build
    for cache in made:
        cache.close()
        cache.vectors.close()
        cache.entries.close()


def q(text: str) -> list[Turn]:
    return [Turn("user", text)]


def key(text: str) -> str:
    return query_text(q(text)).exact_key


def test_finding_cancelled_insert_undoes_another_requests_work(make, embedder: Embedder) -> None:
    """An insert is cancelled (its client went away, the service drains) while its SQLite write waits for
    the lock. The old code then left that write's transaction open on the one shared connection: the
    hits flushed next went into it, and the next insert failed ("cannot start a transaction within a
    transaction") with a ROLLBACK that undid them. Now every SQLite call is a whole transaction on a
    connection of its own: the next insert and the hits are stored, the cancelled insert is not."""
    m = make()
    scope = Scope("m")

    async def go() -> None:
        await m.cache.insert(scope, [(q("Is water wet?"), "yes")])
        blocker = m.lock()
        calls = embedder.calls
        cancelled = asyncio.create_task(m.cache.insert(scope, [(q("Will this be cancelled?"), "maybe")]))
        while embedder.calls == calls:  # embedded: its SQLite write comes next and waits for the lock
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        cancelled.cancel()
        await asyncio.wait([cancelled])
        blocker.rollback()
        await asyncio.sleep(0.3)  # the cancelled request's thread gets the lock and finishes its write
        hit = await m.cache.query(scope, q("Is water wet?"))  # another request: a hit, flushed below
        assert hit.hit and hit.exact
        await m.cache.flush()
        stored = await m.cache.insert(scope, [(q("Is fire hot?"), "yes")])  # and another one
        assert len(stored.ids) == 1

    asyncio.run(go())
    answers = {a for (a,) in m.rows("SELECT answer FROM entries")}
    assert answers == {"yes"} and len(m.rows("SELECT id FROM entries")) == 2  # water and fire; not "maybe"
    assert m.rows("SELECT hits FROM entries WHERE exact_key = ?", key("Is water wet?")) == [(1,)]
    assert [r[0] for r in m.rows("SELECT hit FROM hit_log")] == [1]


def test_finding_eviction_failure_fails_a_stored_insert(make) -> None:
    """Eviction (max entries per scope 1 here) used to run after the insert had committed: when it failed,
    the client got an error for an entry that was stored. Now it runs inside the insert's transaction:
    it fails, and nothing of the insert is stored (the answer and the store agree); the vectors of the
    failed insert are deleted from Milvus by the cleanup."""
    m = make(max_entries_per_scope=1)
    scope = Scope("m")

    async def go() -> None:
        await m.cache.insert(scope, [(q("What do pandas eat?"), "bamboo")])
        m.rows("CREATE TRIGGER refuse_delete BEFORE DELETE ON entries BEGIN SELECT RAISE(ABORT, 'deletes refused'); END")
        failed = False
        try:
            await m.cache.insert(scope, [(q("Why is the sky blue?"), "scattering")])
        except errors.UnimodelError as exc:
            failed = True
            assert isinstance(exc, errors.Unavailable) and "deletes refused" in exc.message
        stored = m.rows("SELECT answer FROM entries WHERE exact_key = ?", key("Why is the sky blue?"))
        assert failed and stored == []  # an error answered: nothing stored
        assert await m.cache.count(scope) == 1
        assert (await m.cache.query(scope, q("What do pandas eat?"))).hit  # the older entry is intact
        # the failed insert's vector was written before its commit failed: the cleanup deletes it
        assert await m.cache.reclaim() == 1 and await m.cache.cleanup_pending() == 0
        vector = (await m.cache.embed(["Why is the sky blue?"]))[0]
        assert [s for _, s in m.cache.vectors.search(scope.key, vector, 4) if s > 0.99] == []
        # the store works again: the insert evicts inside its transaction, and the evicted entry's vector
        # waits for the cleanup, which cannot fail the insert (Milvus unreachable here)
        m.rows("DROP TRIGGER refuse_delete")
        result = await m.cache.insert(scope, [(q("Why is the sky blue?"), "scattering")])
        assert result.evicted == 1 and await m.cache.count(scope) == 1
        uri = m.cache.vectors.uri
        m.cache.vectors.uri = "http://127.0.0.1:1"
        m.cache.vectors.close()
        with pytest.raises(errors.Unavailable, match="Milvus"):
            await m.cache.reclaim()
        assert await m.cache.cleanup_pending() == 1 and await m.cache.count(scope) == 1
        m.cache.vectors.uri = uri
        m.cache.vectors.close()
        assert await m.cache.reclaim() == 1 and await m.cache.cleanup_pending() == 0

    asyncio.run(go())


def test_finding_retried_insert_creates_a_duplicate(make) -> None:
    """A client that got no answer retries: the same question and answer in the same scope is one entry
    (refreshed, its id answered), within one insert too. A different answer to the same question is
    still a second entry (the ambiguity rule decides between them)."""
    m = make()
    scope = Scope("m", "team-a")

    async def go() -> None:
        first = await m.cache.insert(scope, [(q("How far away is the Moon?"), "384,400 km")])
        m.clock.now += 10
        again = await m.cache.insert(scope, [(q("how far away is the moon"), "384,400 km")])
        assert again.ids == first.ids and again.added == 0 and again.refreshed == 1
        bulk = await m.cache.insert(scope, [
            (q("How far away is the Moon?"), "384,400 km"), (q("What is a light year?"), "a distance"),
            (q("What is a light year?"), "a distance"),
        ])
        assert bulk.ids[0] == first.ids[0] and bulk.ids[1] == bulk.ids[2] and bulk.added == 1
        other = await m.cache.insert(Scope("m", "team-b"), [(q("How far away is the Moon?"), "384,400 km")])
        assert other.ids != first.ids  # another scope: its own entry
        assert await m.cache.count(scope) == 2

    asyncio.run(go())
    created = m.rows("SELECT created FROM entries WHERE exact_key = ? AND tenant = 'team-a'", key("How far away is the Moon?"))
    assert created == [(1010.0,)]  # refreshed by the retry: its TTL counts from the last insert


def test_finding_insert_committed_after_its_deadline(make) -> None:
    """An insert whose deadline passes while it waits for the store is refused with DEADLINE_EXCEEDED and
    stores nothing; the old code had no deadline at all (it committed whenever it got the lock)."""
    m = make(reply_margin_s=0.2)
    scope = Scope("m")

    async def go() -> None:
        blocker = m.lock()
        started = time.monotonic()
        try:
            with pytest.raises(errors.DeadlineExceeded, match="nothing was written"):
                await m.cache.insert(scope, [(q("Is ice cold?"), "yes")], deadline=time.time() + 1.0)
            assert time.monotonic() - started < 1.0  # refused before the deadline (its margin), not after
        finally:
            blocker.rollback()
            blocker.close()
        with pytest.raises(errors.DeadlineExceeded):  # no time left: nothing is started
            await m.cache.insert(scope, [(q("Is ice cold?"), "yes")], deadline=time.time() + 0.1)
        assert await m.cache.count() == 0
        stored = await m.cache.insert(scope, [(q("Is ice cold?"), "yes")], deadline=time.time() + 10)
        assert stored.added == 1 and (await m.cache.query(scope, q("Is ice cold?"), deadline=time.time() + 10)).hit

    asyncio.run(go())


# the service behind the gateway ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_repository: Path) -> Iterator[tuple[Services, Path]]:
    """nats-server, etcd, Milvus Lite, the cache, router, batcher, an embedding-worker and a gateway whose
    requests have a 3 s deadline."""
    tmp = tmp_path_factory.mktemp("cache-writes")
    infra = Infra(tmp)
    services = Services(infra)
    milvus = MilvusLiteServer(free_port(), tmp / "milvus", sink=infra.sink)
    try:
        infra.start()
        milvus.start_and_wait()
        services.start("cache", "--data-dir", str(tmp / "cache"), "--milvus-uri", milvus.uri)
        services.start("embedding-worker", "--instance-id", "embedder-0")
        services.start("router")
        services.start("batcher")
        services.http_port, services.grpc_port = free_port(), free_port()
        gw = services.start(
            "gateway", "--http-port", str(services.http_port), "--grpc-port", str(services.grpc_port),
            "--model-repository", str(model_repository), "--load-models", EMBEDDER, "--request-timeout-s", "3",
        )
        wait_until(lambda: http_ok(f"{services.url}/health/ready"), 60, "gateway ready", gw)
        services.wait_models([EMBEDDER])
        yield services, tmp / "cache" / "cache.sqlite"
    finally:
        services.stop()
        milvus.stop()
        infra.stop()


def test_finding_cache_commits_after_the_gateway_gave_up(cluster: tuple[Services, Path]) -> None:
    """The store is slow (another connection holds SQLite's write lock for 4.5 s) and the gateway's deadline
    is 3 s. The old cache waited for the lock and committed after the gateway had answered 503, so the
    client's retry stored the entry twice. Now the cache gives up before the deadline and says so, nothing
    is stored, and the retries store one entry."""
    services, sqlite_file = cluster
    url = f"{services.url}/modelcache"
    insert = {
        "type": "insert", "scope": {"model": "writes"},
        "chat_info": [{"query": [{"role": "user", "content": "What is the tallest mountain?"}], "answer": "Everest"}],
    }
    query = {"type": "query", "scope": {"model": "writes"}, "query": [{"role": "user", "content": "What is the tallest mountain?"}]}

    def rows() -> list[tuple]:
        db = sqlite3.connect(sqlite_file)
        try:
            return db.execute("SELECT id FROM entries WHERE model = 'writes'").fetchall()
        finally:
            db.close()

    warm = httpx.post(url, json=json.dumps({**insert, "scope": {"model": "warm-up"}}), timeout=30)
    assert warm.status_code == 200, warm.text  # the embedding path works
    blocker = sqlite3.connect(sqlite_file, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        r = httpx.post(url, json=json.dumps(insert), timeout=30)
        took = time.monotonic() - started
        assert r.status_code == 503 and r.json()["writeStatus"] == "exception", r.text
        time.sleep(max(0.0, 4.5 - took))
    finally:
        blocker.rollback()
        blocker.close()
    time.sleep(1.5)  # the old cache committed here
    assert rows() == []
    assert "nothing was written" in r.json()["errorDesc"], r.text  # the cache's answer, not the gateway's timeout
    assert took < 3.0
    assert httpx.post(url, json=json.dumps(query), timeout=30).json()["cacheHit"] is False
    first = httpx.post(url, json=json.dumps(insert), timeout=30)  # the client retries, twice
    second = httpx.post(url, json=json.dumps(insert), timeout=30)
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert first.json()["ids"] == second.json()["ids"] and len(rows()) == 1
    assert httpx.post(url, json=json.dumps(query), timeout=30).json()["cacheHit"] is True
