"""The cache's logic (cache/semantic.py) on its real stores: SQLite, Milvus Lite (pymilvus starts its
server on a local socket for a .db file) and all-MiniLM-L6-v2 run with onnxruntime in the test process.

Covers what the cluster test cannot reach quickly: LRU eviction per scope and overall, TTL expiry (with
a controlled clock), replacing nothing on a failed insert, the ambiguity rule, and the timing split.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.minilm import Clock, Embedder
from unimodel.cache.entries import EntryStore
from unimodel.cache.querytext import Turn
from unimodel.cache.semantic import Limits, Scope, SemanticCache
from unimodel.cache.vectors import VectorIndex
from unimodel.core import errors

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def embedder(model_repository: Path) -> Embedder:
    return Embedder(model_repository / "all-minilm-l6-v2")


@pytest.fixture
def make(tmp_path: Path, embedder: Embedder) -> Iterator:
    made: list[SemanticCache] = []

    def build(**limits: object) -> tuple[SemanticCache, Clock]:
        clock = Clock()
        vectors = VectorIndex(str(tmp_path / "milvus.db"), f"c{len(made)}", 384)
        cache = SemanticCache(EntryStore(tmp_path / f"c{len(made)}.sqlite"), vectors, embedder, Limits(**limits), clock=clock)  # type: ignore[arg-type]  # limits: Limits fields by keyword, typed object here
        made.append(cache)
        return cache, clock

    yield build
    for cache in made:
        cache.close()
        cache.vectors.close()
        cache.entries.close()


def q(text: str) -> list[Turn]:
    return [Turn("user", text)]


def run(coro):
    return asyncio.run(coro)


def test_lru_eviction_per_scope_keeps_what_was_used(make) -> None:
    cache, clock = make(max_entries_per_scope=3)
    scope, other = Scope("m"), Scope("other")

    async def go() -> None:
        questions = ["How do volcanoes form?", "Why is the sky blue?", "What do pandas eat?"]
        for i, text in enumerate(questions):
            clock.now += 1
            await cache.insert(scope, [(q(text), f"answer {i}")])
        await cache.insert(other, [(q("Why is the sky blue?"), "other scope")])
        clock.now += 1
        assert (await cache.query(scope, q("How do volcanoes form?"))).hit  # used: now the most recent
        await cache.flush()
        clock.now += 1
        result = await cache.insert(scope, [(q("How far away is the Moon?"), "answer 3")])
        assert result.evicted == 1
        assert await cache.count(scope) == 3 and await cache.count(other) == 1
        assert not (await cache.query(scope, q("Why is the sky blue?"))).hit  # the least recently used went
        assert (await cache.query(scope, q("How do volcanoes form?"))).hit
        assert (await cache.query(other, q("Why is the sky blue?"))).entry.answer == "other scope"

    run(go())


def test_max_entries_overall(make) -> None:
    cache, clock = make(max_entries=2)

    async def go() -> None:
        for i, model in enumerate(["a", "b", "c"]):
            clock.now += 1
            result = await cache.insert(Scope(model), [(q(f"Question number {i} about rivers"), str(i))])
            assert result.entries == min(i + 1, 2) and result.evicted == (1 if i == 2 else 0)
        assert await cache.count() == 2
        assert not (await cache.query(Scope("a"), q("Question number 0 about rivers"))).hit

    run(go())


def test_ttl_expiry(make) -> None:
    cache, clock = make(ttl_s=60)

    async def go() -> None:
        await cache.insert(Scope("m"), [(q("What is the speed of light?"), "c")])
        assert (await cache.query(Scope("m"), q("What is the speed of light?"))).hit
        clock.now += 61
        assert not (await cache.query(Scope("m"), q("What is the speed of light?"))).hit  # never served expired
        assert not (await cache.query(Scope("m"), q("How fast does light travel?"))).hit
        assert await cache.expire() == 1 and await cache.count() == 0

    run(go())


def test_failed_insert_writes_nothing(make) -> None:
    cache, _clock = make()

    async def go() -> None:
        await cache.insert(Scope("m"), [(q("Is water wet?"), "yes")])
        cache.vectors.uri = "http://127.0.0.1:1"  # Milvus unreachable from here on
        cache.vectors.close()
        with pytest.raises(errors.Unavailable, match="Milvus"):
            await cache.insert(Scope("m"), [(q("Is fire hot?"), "yes"), (q("Is ice cold?"), "yes")])
        assert await cache.count() == 1  # the SQLite half was rolled back
        with pytest.raises(errors.InvalidArgument, match="empty"):
            await cache.insert(Scope("m"), [(q("fine"), "ok"), (q("   "), "empty query")])

    run(go())


def test_ambiguous_matches_are_misses_and_timing_is_split(make) -> None:
    cache, _clock = make()

    async def go() -> None:
        # the same question stored twice with different answers: which one to serve is a guess
        await cache.insert(Scope("m"), [(q("What does the fox say?"), "A"), (q("What does the fox say?"), "B")])
        result = await cache.query(Scope("m"), q("What is it that the fox says?"))
        assert not result.hit and result.ambiguous and result.best_similarity > 0.8
        assert result.embed_ns > 0 and result.search_ns > 0 and result.total_ns >= result.embed_ns + result.search_ns
        exact = await cache.query(Scope("m"), q("what does the fox say"))
        assert exact.hit and exact.exact and exact.embed_ns == 0  # no embedding on the exact path
        await cache.flush()
        log = await cache.log(Scope("m"), 10)
        assert [r.hit for r in log] == [True, False] and log[1].similarity == pytest.approx(result.best_similarity)

    run(go())
