"""The cache's plain logic: query text and keys, the guard, the SQLite store (real SQLite, in a temp dir)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from unimodel.cache import guard
from unimodel.cache.entries import EntryStore, LogRecord, NewEntry, Quotas, TooLate
from unimodel.cache.querytext import QueryTextError, Turn, query_text, question_of, scope_key, threshold_for


def user(text: str) -> list[Turn]:
    return [Turn("user", text)]


# query text ------------------------------------------------------------------------------------------
def test_splice_is_modelcache_s_and_the_embedded_text_drops_roles() -> None:
    t = query_text([Turn("system", "You are terse."), Turn("user", "Hi there"), Turn("assistant", "Hello"), Turn("user", "Bye")])
    assert t.spliced == "system###You are terse.|||user###Hi there|||assistant###Hello|||user###Bye"
    assert t.embedding_text == "You are terse.\nHi there\nHello\nBye"
    # what the guard and the verifier compare a stored entry by: its last message, in the same context
    assert question_of(t.spliced) == (t.question, t.context_key) == ("Bye", t.context_key)


def test_the_context_is_everything_before_the_last_message() -> None:
    go_on = [Turn("user", "Tell me about volcanoes"), Turn("assistant", "They form where..."), Turn("user", "yes, go on")]
    other = [Turn("user", "Tell me about pandas"), Turn("assistant", "Pandas eat..."), Turn("user", "yes, go on")]
    a, b = query_text(go_on), query_text(other)
    assert a.question == b.question == "yes, go on" and a.context_key != b.context_key
    # normalised as the exact key is; a system prompt is context; one message alone has none
    assert query_text([Turn("user", "tell me about VOLCANOES "), *go_on[1:]]).context_key == a.context_key
    assert query_text([Turn("system", "Be brief."), Turn("user", "Hi")]).context_key != query_text(user("Hi")).context_key
    assert query_text(user("Hi")).context_key == "" and query_text(user("Hi")).question == "Hi"


def test_exact_key_ignores_case_spacing_and_trailing_punctuation_only() -> None:
    a = query_text(user("What is the capital of France?")).exact_key
    assert a == query_text(user("  what is the   CAPITAL of france ")).exact_key
    assert a != query_text(user("What is the capital of Spain?")).exact_key
    # the role and the system prompt are part of the key
    assert a != query_text([Turn("system", "Answer in French."), Turn("user", "What is the capital of France?")]).exact_key
    assert query_text([Turn("developer", "x"), Turn("user", "y")]).exact_key == query_text([Turn("system", "x"), Turn("user", "y")]).exact_key


@pytest.mark.parametrize(
    ("turns", "fragment"),
    [([], "no messages"), (user("   "), "empty"), ([Turn("assistant", "only me")], "empty"), ([Turn("wizard", "x")], "role")],
)
def test_uncacheable_queries(turns: list[Turn], fragment: str) -> None:
    with pytest.raises(QueryTextError, match=fragment):
        query_text(turns)


def test_thresholds_by_length() -> None:
    short, long = query_text(user("Short question?")), query_text(user("x" * 81))
    assert threshold_for(short, 0.94, 0.87) == 0.94 and threshold_for(long, 0.94, 0.87) == 0.87
    assert threshold_for(long, 0.94, 0.87, boundary=256) == 0.94  # ModelCache's own boundary


def test_scope_keys_separate_models_and_tenants() -> None:
    keys = {scope_key("m", ""), scope_key("m", "team-a"), scope_key("m2", ""), scope_key("m", "team-b")}
    assert len(keys) == 4 and all(k.isalnum() and len(k) == 32 for k in keys)


# guard ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("How do I boil an egg?", "How do I boil 12 eggs?"),
        ("Best phone of 2019?", "Best phone of 2021?"),
        ("How do I enable dark mode?", "How do I not enable dark mode?"),
        ("Why can't I log in?", "Why can I log in?"),
        ("How is Messi better than Ronaldo?", "How is Ronaldo better than Messi?"),
        ("How do you convert liters to kilograms?", "How do you convert kilograms to liters?"),
        ("Is there a rehab center in San Francisco County?", "Is there a rehab center in San Mateo County?"),
        ("Salary for T3 L1 at SAP?", "Salary for T1 L3 at SAP?"),
    ],
)
def test_guard_refuses_different_questions(a: str, b: str) -> None:
    assert not guard.compatible(a, b) and not guard.compatible(b, a)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("How do I reset my password?", "How can I reset my password?"),
        ("The `load_dataset` function retrieves a dataset from the Hub.", "The `load_dataset` function loads a dataset from the Hub."),
        ("Which was the first novel?", "What was the first novel?"),
        ("Is jailbreaking iphone 6s worth it?", "Is it worth jailbreaking the iPhone 6s?"),
        ("Should I buy a car or a bike?", "Should I buy a car or a bike right now?"),
    ],
)
def test_guard_lets_paraphrases_through(a: str, b: str) -> None:
    assert guard.compatible(a, b)


# the SQLite store ----------------------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path: Path) -> EntryStore:
    s = EntryStore(tmp_path / "cache.sqlite")
    yield s
    s.close()


def _new(text: str, answer: str = "a") -> NewEntry:
    q = query_text(user(text))
    return NewEntry(q.exact_key, q.spliced, answer)


def _add(store: EntryStore, scope: str, new: list[NewEntry], now: float, commit_by: float | None = None) -> list[int]:
    """An insert's two SQLite steps (the vectors would go to Milvus in between)."""
    ids = store.reserve(len(new), not_before=now + 60)
    return store.commit_insert(scope, "m", "", new, dict(enumerate(ids)), now, Quotas(), commit_by).ids


def test_insert_commit_and_rollback(store: EntryStore) -> None:
    ids = _add(store, "s1", [_new("one"), _new("two")], now=100.0)
    assert store.count("s1") == 2 and len(ids) == 2
    with pytest.raises(TooLate):  # past its deadline: rolled back, nothing of it stays
        _add(store, "s1", [_new("three")], now=101.0, commit_by=1.0)
    assert store.count("s1") == 2 and store.count() == 2


def test_exact_and_get_stay_in_their_scope_and_ttl(store: EntryStore) -> None:
    [old] = _add(store, "s1", [_new("question", "first")], now=100.0)
    [new] = _add(store, "s1", [_new("question", "second")], now=200.0)
    key = query_text(user("question")).exact_key
    hit = store.exact("s1", key, not_before=0)
    assert hit is not None and hit.id == new and hit.answer == "second"
    assert store.exact("s2", key, not_before=0) is None
    assert store.exact("s1", key, not_before=300.0) is None  # expired
    assert set(store.get("s1", [old, new], not_before=150.0)) == {new}
    assert store.get("s2", [old, new], not_before=0) == {}
    assert store.ids_of("s2", [old]) == [] and store.expired(before=150.0) == [old]


class TracedStore(EntryStore):
    """The store with every statement its connections run recorded (bound values expanded)."""

    def __init__(self, path: Path) -> None:
        self.statements: list[str] = []
        super().__init__(path)

    def _connect(self) -> sqlite3.Connection:
        db = super()._connect()
        db.set_trace_callback(self.statements.append)
        return db


def test_lookups_by_id_use_the_primary_key_not_a_scope_index(tmp_path: Path) -> None:
    """A semantic lookup reads its few candidates by id: SQLite must not scan the scope's index for them (it
    did without ANALYZE statistics: every entry of the scope read on each lookup, 5.5 ms at 100k entries)."""
    store = TracedStore(tmp_path / "cache.sqlite")
    try:
        ids = _add(store, "s", [_new(f"question {i}") for i in range(200)], now=10.0)
        store.statements.clear()
        assert sorted(store.get("s", ids[:8], not_before=0)) == ids[:8]
        assert store.ids_of("s", ids[:8]) == ids[:8]
        selects = [s for s in store.statements if s.lstrip().upper().startswith("SELECT")]
        assert len(selects) == 2, store.statements
        db = sqlite3.connect(store.path)
        try:
            for sql in selects:
                plan = " | ".join(row[-1] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}"))
                assert "INTEGER PRIMARY KEY" in plan and "INDEX" not in plan.replace("PRIMARY KEY", ""), (sql, plan)
        finally:
            db.close()
    finally:
        store.close()


def test_least_recently_used_order_follows_hits(store: EntryStore) -> None:
    ids = _add(store, "s", [_new(f"q{i}") for i in range(4)], now=10.0)
    store.touch({ids[0]: (50.0, 3), ids[1]: (40.0, 1)})
    assert store.least_recent("s", 2) == [ids[2], ids[3]]
    assert store.least_recent_overall(3)[-1] == (ids[1], "s")
    assert store.delete(ids[:2]) == 2 and store.count("s") == 2


def test_hit_log_keeps_the_newest(store: EntryStore) -> None:
    records = [LogRecord(float(i), "s", "m", f"q{i}", i % 2 == 0, False, 0.9, i, 1.5) for i in range(10)]
    store.log(records, keep=5)
    recent = store.recent_log("s", 100)
    assert [r.query for r in recent] == ["q9", "q8", "q7", "q6", "q5"]
    assert recent[0].hit is False and recent[1].hit is True and store.recent_log("other", 10) == []
