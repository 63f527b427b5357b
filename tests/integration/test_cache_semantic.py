"""The cache's logic (cache/semantic.py) on its real stores: SQLite, Milvus Lite (pymilvus starts its
server on a local socket for a .db file) and all-MiniLM-L6-v2 run with onnxruntime in the test process.

Covers what the cluster test cannot reach quickly: LRU eviction per scope and overall, TTL expiry (with
a controlled clock), replacing nothing on a failed insert, the ambiguity rule, the timing split, the
conversation context a semantic hit needs, and the verification stage (the packaged verifier) with its
verdict in the result and the hit log.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.minilm import Clock, Embedder
from unimodel.cache.entries import EntryStore
from unimodel.cache.querytext import Turn
from unimodel.cache.semantic import VERDICT_ACCEPTED, VERDICT_NONE, VERDICT_REJECTED, Limits, Scope, SemanticCache
from unimodel.cache.settings import RECALL_LONG, RECALL_SHORT, VERIFY_THRESHOLD, VETO_THRESHOLD
from unimodel.cache.vectors import VectorIndex
from unimodel.cache.verifier import Verifier
from unimodel.core import errors

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def embedder(model_repository: Path) -> Embedder:
    return Embedder(model_repository / "all-minilm-l6-v2")


@pytest.fixture
def make(tmp_path: Path, embedder: Embedder) -> Iterator:
    made: list[SemanticCache] = []

    def build(verifier: Verifier | None = None, **limits: object) -> tuple[SemanticCache, Clock]:
        clock = Clock()
        vectors = VectorIndex(str(tmp_path / "milvus.db"), f"c{len(made)}", 384)
        cache = SemanticCache(
            EntryStore(tmp_path / f"c{len(made)}.sqlite"), vectors, embedder, Limits(**limits), clock=clock, verifier=verifier,  # type: ignore[arg-type]  # limits: Limits fields by keyword, typed object here
        )
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


def test_a_semantic_hit_needs_the_same_conversation(make) -> None:
    """The earlier turns and the system prompt are part of the match: "yes, go on" after another
    conversation is another question, however close the embeddings (thresholds set low so that the
    other conversation's entry is recalled and must be refused for its context)."""
    cache, _clock = make(threshold_short=0.01, threshold_long=0.01)
    volcano = [Turn("user", "Tell me about volcanoes"), Turn("assistant", "They form where plates meet.")]
    panda = [Turn("user", "Tell me about pandas"), Turn("assistant", "They eat bamboo.")]

    async def go() -> None:
        await cache.insert(Scope("m"), [([*volcano, Turn("user", "yes, go on")], "more about volcanoes")])
        other = await cache.query(Scope("m"), [*panda, Turn("user", "yes, go on")])
        assert not other.hit and other.other_context == 1
        same = await cache.query(Scope("m"), [*volcano, Turn("user", "yes, please go on")])
        assert same.hit and not same.exact and same.entry.answer == "more about volcanoes"
        # a system prompt is context too
        await cache.insert(Scope("m"), [([Turn("system", "Answer in French."), Turn("user", "What is a volcano?")], "Un volcan...")])
        plain = await cache.query(Scope("m"), [Turn("user", "What is a volcano?")])
        assert not (plain.hit and plain.entry.answer == "Un volcan...")

    run(go())


def test_the_verifier_decides_among_the_recalled_candidates(make) -> None:
    """The cache's defaults: candidates from the recall floor up to the threshold need the verifier's
    acceptance, those above it are kept unless it vetoes them."""
    stage = {"verify_threshold": VERIFY_THRESHOLD, "veto_threshold": VETO_THRESHOLD}
    cache, _clock = make(verifier=Verifier.load(), recall_short=RECALL_SHORT, recall_long=RECALL_LONG, **stage)
    # recall floors far below the defaults: every candidate below reaches the verifier, which must refuse it
    loose, _clock = make(verifier=Verifier.load(), recall_short=0.6, recall_long=0.6, **stage)

    async def go() -> None:
        stored = [
            (q("What is the meaning of life?"), "42"),
            (q("How do I improve my English speaking skills?"), "Speak every day"),
            (q("Is coffee good for your heart?"), "In moderation, probably"),
            (q("Why do cats purr?"), "Contentment, mostly"),
            (q("How does a refrigerator work?"), "A heat pump"),
            (q("What is the capital of France?"), "Paris"),
        ]
        await cache.insert(Scope("m"), stored)
        await loose.insert(Scope("m"), stored)
        for question, answer in [
            ("What is life's meaning?", "42"),  # above the threshold: kept (the verifier does not veto)
            ("Tell me the capital of France", "Paris"),  # above it too (0.95): kept, though under the model's own threshold
            ("How can I improve my spoken English?", "Speak every day"),  # under it (0.91): the verifier accepts
        ]:
            result = await cache.query(Scope("m"), q(question))
            assert result.hit and not result.exact and result.entry.answer == answer, (question, result)
            assert result.verdict == VERDICT_ACCEPTED and result.verify_score >= VETO_THRESHOLD
        for question in ["Why do cats meow?", "How does a freezer work?"]:
            result = await loose.query(Scope("m"), q(question))
            assert not result.hit and result.best_similarity >= 0.6, (question, result)
            assert result.verdict == VERDICT_REJECTED and result.rejected_by_verifier >= 1
            assert 0 <= result.verify_score < loose.verify_threshold
        opposite = await loose.query(Scope("m"), q("Is coffee bad for your heart?"))  # the guard refuses it first
        assert not opposite.hit and opposite.rejected_by_guard == 1 and opposite.verdict == VERDICT_NONE
        exact = await cache.query(Scope("m"), q("what is the meaning of life"))
        assert exact.hit and exact.exact and exact.verdict == VERDICT_NONE  # the exact path needs no verification
        await cache.flush()
        log = await cache.log(Scope("m"), 10)  # most recent first
        assert [r.verdict for r in log] == [VERDICT_NONE, VERDICT_ACCEPTED, VERDICT_ACCEPTED, VERDICT_ACCEPTED]
        assert log[1].verify_score >= VERIFY_THRESHOLD and log[0].verify_score == 0
        await loose.flush()
        assert [r.verdict for r in await loose.log(Scope("m"), 10)] == [VERDICT_NONE, VERDICT_REJECTED, VERDICT_REJECTED]

    run(go())
