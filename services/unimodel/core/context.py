"""What travels with every request across hops: request id, deadline and W3C trace context.

The request id is always ours (new_request_id), made where a request enters the cluster; an id a client
sends (HTTP `x-request-id`, gRPC metadata) is kept apart as `client_request_id`: echoed in the answer and
logged, never a key for routing or aborts (a client could name another client's request)."""

from __future__ import annotations

import contextvars
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from unimodel.core.errors import DeadlineExceeded
from unimodel.core.subjects import Header


def now_ms() -> int:
    return int(time.time() * 1000)


grpc_traceparent: contextvars.ContextVar[str] = contextvars.ContextVar("grpc_traceparent", default="")
"""The traceparent of the gateway's gRPC server span around the current call (gateway.traces), which
replaces the caller's own in from_grpc."""

_ID_BATCH = 256
"""Ids made per urandom call (4 KiB of randomness)."""
_ids: list[str] = []


def new_request_id() -> str:
    """A request id of ours: 32 hex digits, all 128 bits from os.urandom, so that no id tells anything
    about another (a client cannot guess the id of someone else's request and abort it; see
    docs/security.md). Ids are cut from one urandom read per 256 of them: about as cheap as a counter
    (~0.2 µs; os.urandom per id ~0.5 µs, uuid4 ~3 µs). list.pop is atomic, so threads may share the
    pool; a forked child empties it (fork below) so it never repeats its parent's ids."""
    try:
        return _ids.pop()
    except IndexError:
        digits = os.urandom(16 * _ID_BATCH).hex()
        _ids.extend([digits[i : i + 32] for i in range(0, 32 * _ID_BATCH, 32)])
        return _ids.pop()


os.register_at_fork(after_in_child=_ids.clear)


@dataclass(frozen=True, slots=True)
class RequestContext:
    request_id: str
    # Absolute deadline, Unix epoch milliseconds; 0 = none.
    deadline_ms: int = 0
    traceparent: str = ""
    tracestate: str = ""
    # The caller's tenant (its API key's; empty when auth is off): set on every item it sends.
    tenant: str = ""
    # The id the client sent (x-request-id), "" when none: echoed and logged, never used as a key.
    client_request_id: str = ""

    @classmethod
    def new(
        cls,
        timeout_s: float,
        request_id: str = "",
        traceparent: str = "",
        tracestate: str = "",
        tenant: str = "",
        client_request_id: str = "",
    ) -> RequestContext:
        """`request_id`: one of ours from an earlier hop (a new one when ""), never a client's; the client's
        goes in `client_request_id`."""
        return cls(
            request_id or new_request_id(), now_ms() + int(timeout_s * 1000), traceparent, tracestate, tenant,
            client_request_id,
        )

    @property
    def echo_id(self) -> str:
        """The id the caller gets back in `x-request-id`: its own when it sent one, else ours."""
        return self.client_request_id or self.request_id

    def remaining_s(self) -> float:
        """Seconds left before the deadline (inf without one)."""
        if not self.deadline_ms:
            return float("inf")
        return (self.deadline_ms - now_ms()) / 1000.0

    def check(self) -> None:
        """Raise DeadlineExceeded when the deadline has passed: expired work is never executed."""
        if self.deadline_ms and now_ms() >= self.deadline_ms:
            raise DeadlineExceeded("deadline exceeded before the request could run", request_id=self.request_id)

    def timeout(self, cap_s: float) -> float:
        """Timeout for the next hop: the time left, at most `cap_s`; raises when none is left."""
        self.check()
        return min(cap_s, self.remaining_s())

    @property
    def trace_id(self) -> str:
        """The trace id (32 hex digits) of the traceparent, "" without one."""
        return self.traceparent[3:35] if len(self.traceparent) == 55 else ""

    # NATS headers ------------------------------------------------------------------------------
    def trace_headers(self) -> dict[str, str]:
        """The W3C trace context (tracestate only travels with a traceparent)."""
        if not self.traceparent:
            return {}
        if self.tracestate:
            return {Header.TRACEPARENT: self.traceparent, Header.TRACESTATE: self.tracestate}
        return {Header.TRACEPARENT: self.traceparent}

    def to_headers(self) -> dict[str, str]:
        h = {Header.REQUEST_ID: self.request_id}
        if self.deadline_ms:
            h[Header.DEADLINE] = str(self.deadline_ms)
        h.update(self.trace_headers())
        return h

    @classmethod
    def from_headers(cls, headers: Mapping[str, str] | None, default_timeout_s: float) -> RequestContext:
        headers = headers or {}
        deadline = headers.get(Header.DEADLINE, "")
        return cls(
            request_id=headers.get(Header.REQUEST_ID) or new_request_id(),
            deadline_ms=int(deadline) if deadline.isdigit() else now_ms() + int(default_timeout_s * 1000),
            traceparent=headers.get(Header.TRACEPARENT, ""),
            tracestate=headers.get(Header.TRACESTATE, ""),
        )

    # gRPC metadata -----------------------------------------------------------------------------
    @classmethod
    def from_grpc(
        cls,
        metadata: Iterable[tuple[str, str | bytes]] | None,
        time_remaining: float | None,
        default_timeout_s: float,
        tenant: str = "",
    ) -> RequestContext:
        md = {k.lower(): (v.decode() if isinstance(v, bytes) else v) for k, v in (metadata or ())}
        timeout = default_timeout_s if time_remaining is None else min(time_remaining, default_timeout_s)
        return cls.new(
            timeout,
            traceparent=grpc_traceparent.get() or md.get("traceparent", ""),
            tracestate=md.get("tracestate", ""),
            tenant=tenant,
            client_request_id=md.get("x-request-id", ""),
        )
