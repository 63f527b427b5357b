"""What travels with every request across hops: request id, deadline and W3C trace context."""

from __future__ import annotations

import contextvars
import itertools
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from unimodel.core.errors import DeadlineExceeded
from unimodel.core.subjects import Header


def now_ms() -> int:
    return int(time.time() * 1000)


grpc_traceparent: contextvars.ContextVar[str] = contextvars.ContextVar("grpc_traceparent", default="")
"""The traceparent of the gateway's gRPC server span around the current call (gateway.traces), which
replaces the caller's own in from_grpc."""

_ID_PREFIX = uuid.uuid4().hex[:16]
_ID_NUMBERS = itertools.count(1)


def new_request_id() -> str:
    """32 hex digits, unique across processes: this process's random prefix and a counter (no
    urandom system call per request, as uuid4 would make)."""
    return f"{_ID_PREFIX}{next(_ID_NUMBERS):016x}"


@dataclass(frozen=True, slots=True)
class RequestContext:
    request_id: str
    # Absolute deadline, Unix epoch milliseconds; 0 = none.
    deadline_ms: int = 0
    traceparent: str = ""
    tracestate: str = ""
    # The caller's tenant (its API key's; empty when auth is off): set on every item it sends.
    tenant: str = ""

    @classmethod
    def new(
        cls, timeout_s: float, request_id: str = "", traceparent: str = "", tracestate: str = "", tenant: str = ""
    ) -> RequestContext:
        return cls(request_id or new_request_id(), now_ms() + int(timeout_s * 1000), traceparent, tracestate, tenant)

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
            request_id=md.get("x-request-id", ""),
            traceparent=grpc_traceparent.get() or md.get("traceparent", ""),
            tracestate=md.get("tracestate", ""),
            tenant=tenant,
        )
