"""Every NATS subject, queue group and header name UniModel uses, in one place."""

from __future__ import annotations

import re

from unimodel.core.kinds import SERVICE_KINDS, WORKER_KINDS

ROOT = "unimodel.v1"

# Queue groups: replicas of one service share a subject's load.
QUEUE_BATCHER = "batcher"
QUEUE_ROUTER = "router"
QUEUE_CACHE = "cache"

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/\-]{0,127}$")
_TOKEN_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def is_valid_model_name(name: str) -> bool:
    """Letters, digits and . _ : / - (names like `llama-3.1-8b` or `org/model`), at most 128 characters."""
    return bool(_MODEL_NAME.match(name))


def model_token(name: str) -> str:
    """A model name as one subject token: characters NATS gives meaning to ('.') and others are
    escaped as ~HH (hex), reversibly; plain names stay as they are."""
    return "".join(c if c in _TOKEN_SAFE else f"~{ord(c):02X}" for c in name)


def model_from_token(token: str) -> str:
    return re.sub(r"~([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), token)


def batch(model: str) -> str:
    """gateway -> batcher: one BatchItem for `model` (queue group QUEUE_BATCHER)."""
    return f"{ROOT}.batch.{model_token(model)}"


BATCH_ALL = f"{ROOT}.batch.*"


def bundle(model: str) -> str:
    """gateway -> batcher: an ItemBundle, several BatchItems for `model` (queue group QUEUE_BATCHER)."""
    return f"{ROOT}.bundle.{model_token(model)}"


BUNDLE_ALL = f"{ROOT}.bundle.*"


def route(model: str) -> str:
    """batcher -> router: one BatchRequest for `model` (queue group QUEUE_ROUTER)."""
    return f"{ROOT}.route.{model_token(model)}"


ROUTE_ALL = f"{ROOT}.route.*"


def worker_infer(instance_id: str) -> str:
    """batcher (or router) -> one worker instance: a BatchRequest it must run."""
    return f"{ROOT}.worker.{instance_id}.infer"


def worker_control(instance_id: str) -> str:
    """router -> one worker instance: a ModelCommand (load / unload a model); the reply is a ModelStatus."""
    return f"{ROOT}.worker.{instance_id}.control"


def alive(instance_id: str) -> str:
    """anyone -> one instance of any kind: an empty request it answers for as long as its process is
    connected (draining included). NATS's "no responders" on it means the process is gone."""
    return f"{ROOT}.alive.{instance_id}"


ABORT = f"{ROOT}.abort"
"""gateway -> every worker (plain subscription, no queue group): an AbortRequest, generations to stop."""


LOAD = f"{ROOT}.load"
"""worker -> every router and batcher (plain subscription): a ModelLoad when a generation ends."""
ROUTING_TABLE = f"{ROOT}.routing.table"
"""router -> every batcher (plain subscription): a RoutingTable, on every change and every few seconds."""
ROUTING_TABLE_GET = f"{ROOT}.routing.get"
"""batcher -> routers (queue group QUEUE_ROUTER): an empty request a starting batcher sends; the answer is a
RoutingTable."""
SUSPECT = f"{ROOT}.routing.suspect"
"""batcher -> every router (plain subscription): a WorkerSuspected, a worker that did not answer a batch."""


CACHE_QUERY = f"{ROOT}.cache.query"
"""gateway -> cache (queue group QUEUE_CACHE): CacheQueryRequest -> CacheQueryResponse."""
CACHE_INSERT = f"{ROOT}.cache.insert"
"""gateway -> cache: CacheInsertRequest -> CacheInsertResponse (all entries stored, or none)."""
CACHE_REMOVE = f"{ROOT}.cache.remove"
"""gateway -> cache: CacheRemoveRequest -> CacheRemoveResponse."""
CACHE_LOG = f"{ROOT}.cache.log"
"""gateway -> cache: CacheLogRequest -> CacheLogResponse (the scope's most recent lookups)."""


def replies(instance_id: str) -> str:
    """Answers to one instance's requests: `<replies>.<token>` is one request's inbox (its reply_to)."""
    return f"{ROOT}.reply.{instance_id}"


REPLY_BATCH_TOKEN = "batch"
"""`<replies>.batch` (subjects.reply_batch) takes ReplyBatch messages: several answers in one message."""


def reply_batch(instance_id: str) -> str:
    return f"{replies(instance_id)}.{REPLY_BATCH_TOKEN}"


def blobs(instance_id: str) -> str:
    """Payloads one instance holds by reference (core/blobs.py): `<blobs>.<token>` is one payload; a request
    there with a range gets its bytes."""
    return f"{ROOT}.blob.{instance_id}"


def model_of(subject: str) -> str:
    """The model name of a batch/route subject."""
    return model_from_token(subject.rsplit(".", 1)[-1])


class Header:
    """NATS message headers (W3C trace context uses its own standard names)."""

    REQUEST_ID = "Um-Request-Id"
    # Absolute deadline in Unix epoch milliseconds.
    DEADLINE = "Um-Deadline"
    ERROR_CODE = "Um-Error-Code"
    ERROR_MESSAGE = "Um-Error-Message"
    RETRY_AFTER = "Um-Retry-After"
    # Prefix of headers carrying an error's metadata (Um-Error-Meta-field: max_tokens).
    ERROR_META = "Um-Error-Meta-"
    # An answer held by reference (core/blobs.py): "<BlobRef.subject> <size>[ <BlobRef.local>]", and an empty body.
    BLOB = "Um-Blob"
    TRACEPARENT = "traceparent"
    TRACESTATE = "tracestate"


# Permissions ------------------------------------------------------------------------------------------
# What each service may publish and subscribe to (nats_config.render_server_config turns this into the
# nats-server `authorization` block; docs/security.md). Every service answers liveness probes on its
# alive subject, and requests made with Bus.request wait on an inbox under inbox_prefix(kind, id)
# (nats-py's request inboxes), so a service reads only the answers to its own requests.
#
# Two granularities. One user per service *kind* (compose, Kubernetes: replicas share a secret) may read
# what any instance of its kind reads. One user per *instance* (`unimodel up` mints one for every process it
# starts, local/credentials.py) reads only its own subjects: a worker cannot subscribe to another worker's
# work, nor a gateway to another gateway's answers. Either way, where a service answers (a worker to the
# inbox an item names) it may publish into any instance's reply tree: an answer lands only on an inbox a
# caller opened, and each inbox ends in a 128-bit random token (replies.ReplyMux) that only the services
# on that request's path ever see.

ANY_INSTANCE = "*"
REPLIES_ALL = f"{ROOT}.reply.*.*"
"""Every instance's answer inboxes (`replies(id).<token>` and `.batch`): workers and the batcher answer
gateways and caches there."""
WORKER_INFER_ALL = worker_infer(ANY_INSTANCE)
WORKER_CONTROL_ALL = worker_control(ANY_INSTANCE)
ALIVE_ALL = alive(ANY_INSTANCE)
CACHE_ALL = f"{ROOT}.cache.*"
GATEWAY_STATS = f"{ROOT}.stats.gateway"
"""KServe model statistics: every gateway answers a request here with its own; the gateway asked for statistics
gathers them all (gateway/kserve/cluster_stats.py)."""
BLOBS_ALL = f"{blobs(ANY_INSTANCE)}.*"
"""Every instance's held payloads: a gateway fetches a worker's big answer, a worker a gateway's big request
(each payload's subject ends in 128 random bits only the services on its request's path see)."""


def inbox_prefix(kind: str, instance_id: str) -> str:
    """Where instance `instance_id` of `kind` gets the answers to its NATS requests (nats-py's
    `inbox_prefix`)."""
    return f"_INBOX.{kind}.{instance_id}"


class Permissions:
    """A NATS user's rights: subjects it may publish to and subscribe to, and whether it may answer
    the reply subject of a request it received (NATS `allow_responses`: one answer per request)."""

    __slots__ = ("publish", "responses", "subscribe")

    def __init__(self, publish: tuple[str, ...], subscribe: tuple[str, ...], *, responses: bool = True) -> None:
        self.publish = publish
        self.subscribe = subscribe
        self.responses = responses

    def __repr__(self) -> str:
        return f"Permissions(publish={self.publish}, subscribe={self.subscribe}, responses={self.responses})"


def _own(kind: str, instance_id: str) -> tuple[str, ...]:
    """What every instance subscribes to for itself: its request inboxes and its liveness probes."""
    return f"{inbox_prefix(kind, instance_id)}.>", alive(instance_id)


def permissions(kind: str, instance_id: str = ANY_INSTANCE) -> Permissions:
    """The rights of instance `instance_id` of service `kind` (core/kinds.py), or, with ANY_INSTANCE, of
    every instance of the kind (one user per kind). Answers to requests (a worker's BatchAck to the
    router, the router's to the batcher, the cache's to the gateway, every liveness answer) go through
    `responses`. KeyError for an unknown kind."""
    own = _own(kind, instance_id)
    if kind in WORKER_KINDS:
        # results and errors to the inbox each item names (a gateway's or a cache's), load reports to routers
        return Permissions(
            publish=(REPLIES_ALL, LOAD, BLOBS_ALL),
            subscribe=(worker_infer(instance_id), worker_control(instance_id), ABORT, f"{blobs(instance_id)}.*", *own),
        )
    table = {
        "gateway": Permissions(
            publish=(
                BATCH_ALL, BUNDLE_ALL, CACHE_QUERY, CACHE_INSERT, CACHE_REMOVE, CACHE_LOG, ABORT, ALIVE_ALL, BLOBS_ALL,
                GATEWAY_STATS,
            ),
            subscribe=(f"{replies(instance_id)}.*", f"{blobs(instance_id)}.*", GATEWAY_STATS, *own),
        ),
        # batches to workers (from the routers' table) or to routers, liveness probes of routers and workers that
        # hold one, suspected workers to the routers; an item it cannot queue is answered at its caller's inbox
        "batcher": Permissions(
            publish=(WORKER_INFER_ALL, ROUTE_ALL, ROUTING_TABLE_GET, SUSPECT, REPLIES_ALL, ALIVE_ALL),
            subscribe=(BATCH_ALL, BUNDLE_ALL, ROUTING_TABLE, LOAD, *own),
        ),
        # the routing table to batchers, batches (of batchers without a table) and commands to workers, and
        # liveness probes of workers that hold a batch (core/dispatch.py `watch_acks`)
        "router": Permissions(
            publish=(ROUTING_TABLE, WORKER_INFER_ALL, WORKER_CONTROL_ALL, ALIVE_ALL),
            subscribe=(ROUTE_ALL, ROUTING_TABLE_GET, LOAD, SUSPECT, *own),
        ),
        # embeddings go through the batcher like any request; answers come to the cache's own inbox
        "cache": Permissions(publish=(BATCH_ALL, BUNDLE_ALL), subscribe=(CACHE_ALL, f"{replies(instance_id)}.*", *own)),
    }
    return table[kind]


PERMISSIONS: dict[str, Permissions] = {kind: permissions(kind) for kind in SERVICE_KINDS}
"""By service kind (core/kinds.py), for one user per kind."""
