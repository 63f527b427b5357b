"""Issue 15, tenant isolation of shared capacity (no network): per-key rate limits (gateway/rate_limits.py, with
a fake clock, and its ASGI hook on a constructed scope), the per-tenant share of a model's queue
(batcher/queue.py), the KServe priority gate (kserve/codec.py) and the per-tenant cache quota in the SQLite
store (cache/entries.py). The cache's eviction on its real Milvus Lite store and the whole path through a
real cluster are in tests/integration/test_security_tenant_isolation.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from unimodel.batcher.queue import BatchPolicy, ModelQueue, Pending
from unimodel.batcher.settings import BatcherSettings
from unimodel.cache.entries import EntryStore, NewEntry, Quotas
from unimodel.cache.settings import CacheSettings
from unimodel.core import errors
from unimodel.gateway.auth import ANONYMOUS, PRINCIPAL_KEY, Principal
from unimodel.gateway.kserve import codec
from unimodel.gateway.rate_limits import (
    RATE_LIMIT_KEY,
    KeyLimits,
    RateLimiter,
    RateLimitMiddleware,
    debit,
    duration,
)
from unimodel.gateway.settings import GatewaySettings, KeyPolicy
from unimodel.v1 import inference_pb2


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tenant(name: str, key_id: str = "", **policy: Any) -> Principal:
    return Principal(
        name, name, admin=False, key_id=key_id or f"id-{name}",
        policy=KeyPolicy(tenant=name, **policy) if policy else None,
    )


# rate limits: the plain logic ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.0201, "21ms"), (0.5, "500ms"), (1, "1s"), (6.5, "6.5s"), (59.9991, "60s"), (60, "1m0s"),
     (360, "6m0s"), (361.2, "6m2s"), (3723, "1h2m3s")],
)
def test_reset_durations_are_written_the_way_openai_writes_them(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_finding_no_request_rate_limit_per_key() -> None:
    clock = FakeClock()
    limits = KeyLimits(2, 0, clock)
    assert limits.admit() is None and limits.admit() is None
    refused = limits.admit()
    assert isinstance(refused, errors.ResourceExhausted) and refused.http_status == 429
    assert refused.retry_after_s == pytest.approx(30.0)  # one request back after 60 s / 2
    assert refused.metadata == {"limit": "rate_limit_exceeded", "type": "requests"}
    assert "requests per minute" in refused.message
    assert dict(limits.headers()) == {
        b"x-ratelimit-limit-requests": b"2", b"x-ratelimit-remaining-requests": b"0",
        b"x-ratelimit-reset-requests": b"1m0s",
    }
    clock.now += 29.9
    assert limits.admit() is not None
    clock.now += 0.2
    assert limits.admit() is None  # refilled continuously: one request per 30 s
    assert limits.admit() is not None


def test_finding_no_token_rate_limit_per_key() -> None:
    clock = FakeClock()
    limits = KeyLimits(0, 100, clock)
    assert limits.admit() is None  # the count is known only when the answer is done: the request runs
    limits.debit(130)  # it used more than the whole minute: the key is in debt
    assert dict(limits.headers())[b"x-ratelimit-remaining-tokens"] == b"0"
    refused = limits.admit()
    assert isinstance(refused, errors.ResourceExhausted) and refused.metadata["type"] == "tokens"
    assert refused.retry_after_s == pytest.approx(31 / (100 / 60))  # until the debt is paid and one token is back
    clock.now += 18  # +30 tokens: level 0, still refused ("remaining tokens <= 0")
    assert limits.admit() is not None
    clock.now += 1
    assert limits.admit() is None
    assert b"x-ratelimit-limit-requests" not in dict(limits.headers())  # only the limits the key has


def test_limits_come_from_the_key_policy_else_the_defaults_and_admins_have_none() -> None:
    limiter = RateLimiter(default_requests_per_minute=10, default_tokens_per_minute=0, clock=FakeClock())
    own = limiter.limits_of(tenant("team-a", requests_per_minute=3, tokens_per_minute=500))
    assert own is not None and own.requests is not None and own.requests.capacity == 3
    assert own.tokens is not None and own.tokens.capacity == 500
    default = limiter.limits_of(tenant("team-b"))
    assert default is not None and default.requests is not None and default.requests.capacity == 10 and default.tokens is None
    assert limiter.limits_of(Principal("ops", "", admin=True, key_id="id-ops")) is None
    assert limiter.limits_of(ANONYMOUS) is None
    assert limiter.limits_of(tenant("team-a", requests_per_minute=3)) is own  # one bucket per key, looked up by id
    assert not RateLimiter().enabled and RateLimiter(default_tokens_per_minute=5).enabled
    settings = GatewaySettings(api_keys={"sk-a": {"tenant": "team-a", "requests_per_minute": 2}, "sk-b": "team-b"})
    assert RateLimiter.from_settings(settings).enabled
    assert not RateLimiter.from_settings(GatewaySettings(api_keys={"sk-b": "team-b"})).enabled


# rate limits: the ASGI hook on a constructed scope -----------------------------------------------------------
class Recorder:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, message: dict[str, Any]) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int:
        return self.messages[0]["status"]

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.messages[0]["headers"])


def _render(path: str, err: errors.UnimodelError) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    return err.http_status, orjson.dumps({"error": {"message": err.message, "path": path}}), [(b"retry-after", b"30")]


def _call(mw: RateLimitMiddleware, principal: Principal, path: str = "/v1/chat/completions") -> Recorder:
    out = Recorder()
    scope = {"type": "http", "method": "POST", "path": path, "headers": [], PRINCIPAL_KEY: principal}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    asyncio.run(mw(scope, receive, out))
    return out


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    debit(scope, 7)  # what the OpenAI routes do once a generation ended
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b"{}"})


def test_finding_no_429_with_openai_rate_limit_headers() -> None:
    clock = FakeClock()
    mw = RateLimitMiddleware(_app, RateLimiter(2, 100, clock=clock), _render)
    caller = tenant("team-a")
    first = _call(mw, caller)
    assert first.status == 200 and first.headers[b"content-type"] == b"application/json"
    assert first.headers[b"x-ratelimit-limit-requests"] == b"2"
    assert first.headers[b"x-ratelimit-remaining-requests"] == b"1"
    assert first.headers[b"x-ratelimit-reset-requests"] == b"30s"
    assert first.headers[b"x-ratelimit-remaining-tokens"] == b"93"  # the route debited 7 tokens
    assert _call(mw, caller).status == 200
    refused = _call(mw, caller)
    assert refused.status == 429 and refused.headers[b"retry-after"] == b"30"
    assert refused.headers[b"x-ratelimit-remaining-requests"] == b"0"
    body = orjson.loads(refused.messages[1]["body"])
    assert "requests per minute" in body["error"]["message"] and body["error"]["path"] == "/v1/chat/completions"
    # another key, an admin, health: their own (or no) limits
    assert _call(mw, tenant("team-b")).status == 200
    admin = _call(mw, Principal("ops", "", admin=True, key_id="id-ops"))
    assert admin.status == 200 and b"x-ratelimit-limit-requests" not in admin.headers
    assert _call(mw, caller, "/health/ready").status == 200


def test_a_key_without_limits_gets_no_rate_limit_state() -> None:
    seen: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope)
        await _app(scope, receive, send)

    mw = RateLimitMiddleware(app, RateLimiter(0, 0, clock=FakeClock()), _render)
    out = _call(mw, tenant("team-a"))
    assert out.status == 200 and RATE_LIMIT_KEY not in seen[0] and b"x-ratelimit-limit-requests" not in out.headers


# the batcher's queue: per-tenant share ---------------------------------------------------------------------------
def _queue(size: int = 4, share: float = 0.5) -> ModelQueue[str]:
    return ModelQueue("m", BatchPolicy(max_rows=8, max_queue_delay_s=10.0, max_queue_size=size, max_queue_share=share))


def _item(n: int, tenant: str) -> Pending[str]:
    return Pending(f"{tenant}-{n}", "payload", tenant=tenant)


def test_finding_one_tenant_fills_a_models_queue_for_everyone() -> None:
    q = _queue(size=4, share=0.5)
    q.put(_item(0, "team-a"), 0.0)
    q.put(_item(1, "team-a"), 0.0)
    with pytest.raises(errors.ResourceExhausted, match="share") as refused:
        q.put(_item(2, "team-a"), 0.0)
    assert refused.value.http_status == 429 and refused.value.retry_after_s > 0
    assert refused.value.metadata["limit"] == "max_queue_share"
    q.put(_item(0, "team-b"), 0.0)  # another tenant still queues
    q.put(_item(1, "team-b"), 0.0)
    assert q.count == 4 and q.tenants == {"team-a": 2, "team-b": 2}


def test_queue_share_is_freed_when_requests_leave_and_requests_without_tenant_are_not_counted() -> None:
    q = _queue(size=4, share=0.5)
    a0, a1 = _item(0, "team-a"), _item(1, "team-a")
    a1.expires = 5.0
    q.put(a0, 0.0)
    q.put(a1, 0.0)
    assert q.cancel(a0)  # the caller went away
    q.put(_item(2, "team-a"), 0.0)
    assert q.expire(6.0) == [a1]
    q.put(_item(3, "team-a"), 6.0)
    assert q.tenants == {"team-a": 2}
    assert [p.request_id for p in q.take(6.0)] == ["team-a-2", "team-a-3"]
    assert q.tenants == {}
    for i in range(4):  # no tenant (no keys, admins): only max_queue_size applies
        q.put(Pending(f"open-{i}", "payload"), 7.0)
    with pytest.raises(errors.ResourceExhausted, match="full"):
        q.put(_item(4, "team-a"), 7.0)


def test_queue_share_rule_and_defaults() -> None:
    assert BatchPolicy(max_queue_size=1024, max_queue_share=0.5).tenant_queue_limit == 512
    assert BatchPolicy(max_queue_size=3, max_queue_share=0.1).tenant_queue_limit == 1  # at least one request
    assert BatcherSettings().max_queue_share == 0.5
    q = _queue(size=2, share=1.0)  # 1 = no per-tenant limit
    q.put(_item(0, "team-a"), 0.0)
    q.put(_item(1, "team-a"), 0.0)
    assert q.count == 2
    with pytest.raises(ValueError, match="max_queue_share"):
        BatchPolicy(max_queue_share=0.0)


def test_a_smaller_share_keeps_what_is_queued_and_refuses_more() -> None:
    q = _queue(size=8, share=1.0)
    for i in range(4):
        q.put(_item(i, "team-a"), 0.0)
    q.set_policy(BatchPolicy(max_rows=8, max_queue_delay_s=10.0, max_queue_size=8, max_queue_share=0.25))
    assert q.count == 4 and q.tenants == {"team-a": 4}
    with pytest.raises(errors.ResourceExhausted, match="share"):
        q.put(_item(9, "team-a"), 0.0)
    assert len(q.clear()) == 4 and q.tenants == {}


# KServe priority ----------------------------------------------------------------------------------------------
def test_finding_any_key_may_jump_the_queue_with_kserve_priority() -> None:
    item = inference_pb2.BatchItem(priority=1)
    with pytest.raises(errors.PermissionDenied, match="priority") as refused:
        codec.check_priority(item, tenant("team-a"))
    assert refused.value.http_status == 403 and refused.value.metadata["field"] == "priority"
    codec.check_priority(item, tenant("team-p", priority=True))  # the key's policy allows it
    codec.check_priority(item, Principal("ops", "", admin=True, key_id="id-ops"))
    codec.check_priority(item, ANONYMOUS)  # no keys configured: the one local user administers
    codec.check_priority(inference_pb2.BatchItem(), tenant("team-a"))  # no priority asked: nothing to check


# the cache store: a tenant's entries across its scopes ---------------------------------------------------------
def test_cache_store_counts_and_evicts_within_one_tenant(tmp_path: Path) -> None:
    store = EntryStore(tmp_path / "c.sqlite")
    try:
        for i, (scope, tenant_name) in enumerate([("s1", "team-a"), ("s2", "team-a"), ("s3", "team-b"), ("s1", "team-a")]):
            [entry_id] = store.reserve(1, not_before=100.0)
            store.commit_insert(scope, "m", tenant_name, [NewEntry(f"k{i}", f"q{i}", f"a{i}")], {0: entry_id}, 10.0 + i, Quotas())
        assert store.count_tenant("team-a") == 3 and store.count_tenant("team-b") == 1
        oldest = store.least_recent_of_tenant("team-a", 2)
        assert len(oldest) == 2 and store.least_recent_of_tenant("team-b", 5) == [3]  # never another tenant's
        assert store.least_recent_of_tenant("team-a", 0) == []
    finally:
        store.close()
    assert CacheSettings().max_entries_per_tenant == 200_000


def test_key_policies_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIMODEL_API_KEYS", '{"sk-a": {"tenant": "team-a", "requests_per_minute": 2}, "sk-b": "team-b"}')
    monkeypatch.setenv("UNIMODEL_DEFAULT_TOKENS_PER_MINUTE", "1000")
    settings = GatewaySettings()
    policy = settings.api_keys["sk-a"]
    assert isinstance(policy, KeyPolicy) and policy.requests_per_minute == 2 and not policy.priority
    limiter = RateLimiter.from_settings(settings)
    limits = limiter.limits_of(tenant("team-b"))  # a plain tenant key: the defaults
    assert limits is not None and limits.tokens is not None and limits.tokens.capacity == 1000 and limits.requests is None
