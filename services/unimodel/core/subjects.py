"""Every NATS subject, queue group and header name UniModel uses, in one place."""

from __future__ import annotations

import re

ROOT = "unimodel.v1"

# Queue groups: replicas of one service share a subject's load.
QUEUE_BATCHER = "batcher"
QUEUE_ROUTER = "router"

_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,127}$")


def is_valid_token(name: str) -> bool:
    """Model names and instance ids become subject tokens: letters, digits, '-' and '_' only."""
    return bool(_TOKEN.match(name))


def batch(model: str) -> str:
    """gateway -> batcher: one PredictRequest for `model` (queue group QUEUE_BATCHER)."""
    return f"{ROOT}.batch.{model}"


BATCH_ALL = f"{ROOT}.batch.*"


def route(model: str) -> str:
    """batcher -> router: one BatchRequest for `model` (queue group QUEUE_ROUTER)."""
    return f"{ROOT}.route.{model}"


ROUTE_ALL = f"{ROOT}.route.*"


def worker_infer(instance_id: str) -> str:
    """router -> one worker instance: a BatchRequest it must run."""
    return f"{ROOT}.worker.{instance_id}.infer"


def model_of(subject: str) -> str:
    """The model token of a batch/route subject."""
    return subject.rsplit(".", 1)[-1]


class Header:
    """NATS message headers (W3C trace context uses its own standard names)."""

    REQUEST_ID = "Um-Request-Id"
    # Absolute deadline in Unix epoch milliseconds.
    DEADLINE = "Um-Deadline"
    ERROR_CODE = "Um-Error-Code"
    ERROR_MESSAGE = "Um-Error-Message"
    RETRY_AFTER = "Um-Retry-After"
    TRACEPARENT = "traceparent"
    TRACESTATE = "tracestate"
