"""Per-key request and token rate limits (requests per minute, tokens per minute), as OpenAI and LiteLLM
apply them, answered with 429, Retry-After and OpenAI's `x-ratelimit-*` headers.

Each limited key has up to two token buckets: `requests_per_minute` (one token per request) and
`tokens_per_minute` (prompt + generated tokens, debited when a generation or an embedding request ends).
A bucket holds at most its per-minute limit and refills continuously at limit/60 per second, so a key
may burst its whole minute at once and then goes at the steady rate. A request is refused while the
request bucket holds less than one token, or while the token bucket is empty or in debt (a token count
is only known once the answer is done, so the request that crosses the limit finishes and the next ones
wait until the debt is refilled).

Limits come from the key's KeyPolicy (`api_keys` entry given as an object), else the gateway's
`default_requests_per_minute` / `default_tokens_per_minute` (0 = no limit). Admin keys and the
anonymous caller (no keys configured) are never limited. The buckets live in the gateway process: with
N gateway replicas a key may use up to N times its limits.

Plain logic with an injected clock (unit-tested with a fake one); RateLimitMiddleware (ASGI) and
GrpcRateLimitInterceptor are the thin transport hooks. A request of a key without limits costs one dict
lookup; when no key has a limit the hooks are not installed at all.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import grpc
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from unimodel.core import errors
from unimodel.core.grpc_server import refusing_handler
from unimodel.gateway.auth import OPEN_GRPC, OPEN_PAGES, OPEN_PATHS, PRINCIPAL_KEY, ApiKeys, Principal
from unimodel.gateway.settings import GatewaySettings, KeyPolicy
from unimodel.v1 import generate_pb2

RATE_LIMIT_KEY = "unimodel.rate_limit"
"""The ASGI scope entry holding the caller's KeyLimits (absent for callers without limits)."""

Headers = list[tuple[bytes, bytes]]
ErrorRender = Callable[[str, errors.UnimodelError], tuple[int, bytes, Headers]]
"""(path, error) -> (status, body, headers) in the error shape of the path's API family."""


def duration(seconds: float) -> str:
    """A duration the way OpenAI writes x-ratelimit-reset-* (Go's time.Duration): 20ms, 1s, 6.5s, 6m0s, 1h2m3s."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        text = f"{math.ceil(seconds * 1000) / 1000:.3f}".rstrip("0").rstrip(".")
        return f"{text}s"
    total = math.ceil(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s"


class Bucket:
    """A token bucket of `capacity` tokens refilled at capacity/60 per second. The level may go below
    zero (a debit after the fact): the debt is refilled like any other shortfall."""

    __slots__ = ("capacity", "rate", "level", "at")

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = float(per_minute)
        self.at = now

    def refill(self, now: float) -> None:
        if now > self.at:
            self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
            self.at = now

    def wait(self, need: float) -> float:
        """Seconds until the level reaches `need` (0: it has)."""
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def reset(self) -> float:
        """Seconds until the bucket is full again (OpenAI's x-ratelimit-reset-*)."""
        return max(0.0, (self.capacity - self.level) / self.rate)

    def remaining(self) -> int:
        return max(0, math.floor(self.level))


class KeyLimits:
    """One key's buckets. `admit` before a request; `debit` the tokens it used once they are known."""

    __slots__ = ("requests", "tokens", "clock")

    def __init__(self, requests_per_minute: int, tokens_per_minute: int, clock: Callable[[], float]) -> None:
        now = clock()
        self.requests = Bucket(requests_per_minute, now) if requests_per_minute > 0 else None
        self.tokens = Bucket(tokens_per_minute, now) if tokens_per_minute > 0 else None
        self.clock = clock

    def admit(self) -> errors.ResourceExhausted | None:
        """Take one request; the refusal (429 with its Retry-After) when a limit is reached."""
        now = self.clock()
        requests, tokens = self.requests, self.tokens
        wait, which = 0.0, ""
        if requests is not None:
            requests.refill(now)
            wait, which = requests.wait(1.0), "requests"
        if tokens is not None:
            tokens.refill(now)
            token_wait = tokens.wait(1.0) if tokens.level <= 0 else 0.0
            if token_wait > wait:
                wait, which = token_wait, "tokens"
        if wait > 0:
            limit = requests if which == "requests" else tokens
            assert limit is not None
            return errors.ResourceExhausted(
                f"rate limit reached for {which} per minute: limit {int(limit.capacity)}, "
                f"remaining {limit.remaining()}; retry in {duration(wait)}",
                retry_after_s=wait, limit="rate_limit_exceeded", type=which,
            )
        if requests is not None:
            requests.level -= 1.0
        return None

    def debit(self, n: int) -> None:
        """Tokens a finished request used (prompt + completion); may leave the bucket in debt."""
        tokens = self.tokens
        if tokens is not None and n > 0:
            tokens.refill(self.clock())
            tokens.level -= n

    def headers(self) -> Headers:
        """OpenAI's x-ratelimit-* headers of the limits this key has."""
        now = self.clock()
        out: Headers = []
        for name, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is None:
                continue
            bucket.refill(now)
            out.append((b"x-ratelimit-limit-" + name.encode(), str(int(bucket.capacity)).encode()))
            out.append((b"x-ratelimit-remaining-" + name.encode(), str(bucket.remaining()).encode()))
            out.append((b"x-ratelimit-reset-" + name.encode(), duration(bucket.reset()).encode()))
        return out


class RateLimiter:
    """The buckets of every key seen, by Principal.key_id (created on a key's first request)."""

    def __init__(
        self, default_requests_per_minute: int = 0, default_tokens_per_minute: int = 0, *,
        policies: Iterable[KeyPolicy] = (), clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.default_rpm = default_requests_per_minute
        self.default_tpm = default_tokens_per_minute
        self.clock = clock
        self.enabled = bool(self.default_rpm or self.default_tpm) or any(
            p.requests_per_minute or p.tokens_per_minute for p in policies
        )
        """False: no key can have a limit (the hooks are not installed)."""
        self._keys: dict[str, KeyLimits | None] = {}

    @classmethod
    def from_settings(cls, settings: GatewaySettings, clock: Callable[[], float] = time.monotonic) -> RateLimiter:
        policies = [v for v in settings.api_keys.values() if isinstance(v, KeyPolicy)]
        return cls(
            settings.default_requests_per_minute, settings.default_tokens_per_minute, policies=policies, clock=clock
        )

    def limits_of(self, principal: Principal) -> KeyLimits | None:
        """The key's buckets; None when it has no limits (admins, the anonymous caller, unlimited keys)."""
        key = principal.key_id
        try:
            return self._keys[key]
        except KeyError:
            pass
        limits = None
        if key and not principal.admin:
            policy = principal.policy
            rpm = (policy.requests_per_minute if policy else None) or self.default_rpm
            tpm = (policy.tokens_per_minute if policy else None) or self.default_tpm
            if rpm or tpm:
                limits = KeyLimits(rpm, tpm, self.clock)
        self._keys[key] = limits
        return limits


def tokens_used(usage: generate_pb2.Usage, chunks: int) -> int:
    """Tokens a generation used: prompt + completion (a stream that ended early: the chunks it sent)."""
    return usage.prompt_tokens + (usage.completion_tokens or chunks)


def debit(scope: Mapping[str, Any], tokens: int) -> None:
    """Debit the tokens a request used from its key's bucket (nothing when the key has no limits)."""
    limits = scope.get(RATE_LIMIT_KEY)
    if limits is not None:
        limits.debit(tokens)


class RateLimitMiddleware:
    """ASGI, inside the API-key check (it reads scope[PRINCIPAL_KEY]): refuses a limited key over its
    limits with 429, and adds the x-ratelimit-* headers to every response of a limited key."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter, render: ErrorRender) -> None:
        self.app, self.limiter, self.render = app, limiter, render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal = scope.get(PRINCIPAL_KEY)
        limits = self.limiter.limits_of(principal) if principal is not None and scope["type"] == "http" else None
        path = scope.get("path", "")
        if limits is None or path.startswith(OPEN_PATHS) or path in OPEN_PAGES:
            await self.app(scope, receive, send)
            return
        refusal = limits.admit()
        if refusal is not None:
            status, body, headers = self.render(path, refusal)
            await send({
                "type": "http.response.start", "status": status,
                "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    *headers, *limits.headers(),
                ],
            })
            await send({"type": "http.response.body", "body": body})
            return
        scope = dict(scope)
        scope[RATE_LIMIT_KEY] = limits

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", ()), *limits.headers()]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class GrpcRateLimitInterceptor(grpc.aio.ServerInterceptor):
    """gRPC: a limited key over its request or token limit gets RESOURCE_EXHAUSTED with the retry delay in
    the status details (ErrorDetail.retry_after_s) and a `retry-after` trailer."""

    def __init__(self, limiter: RateLimiter, keys: ApiKeys) -> None:
        self.limiter, self.keys = limiter, keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if handler_call_details.method.startswith(OPEN_GRPC):
            return await continuation(handler_call_details)
        try:
            principal: Principal | None = self.keys.principal_from_metadata(handler_call_details.invocation_metadata)
        except errors.UnimodelError:
            principal = None  # the API-key check refuses it
        limits = self.limiter.limits_of(principal) if principal is not None else None
        refusal = limits.admit() if limits is not None else None
        handler = await continuation(handler_call_details)
        return handler if refusal is None else _refuse(refusal, handler)


def _refuse(err: errors.UnimodelError, handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that aborts with `err` (status details + retry-after)."""
    return refusing_handler(err, handler, (("retry-after", str(max(1, math.ceil(err.retry_after_s)))),))
