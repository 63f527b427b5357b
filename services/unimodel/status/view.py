"""The cluster's state as plain data, and what is wrong with it. No I/O here: collect.py gathers the
inputs from etcd and the services, render.py prints them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from unimodel.core.kinds import SERVICE_KINDS, WORKER_KINDS
from unimodel.gateway import catalog
from unimodel.v1 import model_pb2, registry_pb2, services_pb2

# Health of an instance as its gRPC health service answers (or UNREACHABLE when it does not)
SERVING = "SERVING"
UNREACHABLE = "UNREACHABLE"


@dataclass
class ServiceRow:
    kind: str
    id: str
    version: str
    grpc_address: str
    host: str  # the machine (container, pod) the process runs on
    pid: int  # its process id there (0: an instance too old to report it)
    started_unix_ms: int
    health: str  # SERVING, NOT_SERVING, UNREACHABLE (…: why)


@dataclass
class HostedModel:
    name: str
    engine: str
    state: str  # LOADING, READY, FAILED, UNLOADING
    inflight: int
    concurrency: int
    pinned: bool
    error: str = ""


@dataclass
class WorkerRow:
    id: str
    kind: str
    engines: list[str]
    outstanding: int | None  # batches the router has sent it and not had answered (None: no router answered)
    models: list[HostedModel]


@dataclass
class ModelRow:
    name: str
    engine: str
    version: str
    max_batch_size: int
    replicas: int
    ready_on: list[str]  # worker ids that serve the model now (READY)
    loading_on: list[str]
    failed_on: list[str]


@dataclass
class QueueRow:
    batcher: str
    model: str
    queued: int
    inflight_batches: int
    max_inflight_batches: int
    max_batch_size: int
    max_queue_delay_ms: float
    max_queue_size: int
    registered: bool


@dataclass
class ClusterView:
    etcd: str
    services: list[ServiceRow] = field(default_factory=list)
    workers: list[WorkerRow] = field(default_factory=list)
    models: list[ModelRow] = field(default_factory=list)
    queues: list[QueueRow] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "healthy": self.healthy}


def _state_name(state: int) -> str:
    return registry_pb2.ModelStatus.State.Name(state)


def build(
    etcd: str,
    instances: list[registry_pb2.InstanceInfo],
    models: list[model_pb2.ModelConfig],
    health: dict[str, str],
    outstanding: dict[str, int] | None,
    queues: dict[str, services_pb2.ListQueuesResponse | str],
) -> ClusterView:
    """The view from what was read: the instances and models in etcd, each instance's health (by id),
    the router's outstanding batches per worker (None when no router answered) and each batcher's
    queues by instance id (or why they could not be read)."""
    view = ClusterView(etcd=etcd)
    for info in sorted(instances, key=lambda i: (_kind_order(i.kind), i.id)):
        view.services.append(ServiceRow(
            kind=info.kind, id=info.id, version=info.version, grpc_address=info.grpc_address,
            host=info.host, pid=info.pid, started_unix_ms=info.started_unix_ms, health=health.get(info.id, UNREACHABLE),
        ))
        if info.kind in WORKER_KINDS:
            view.workers.append(WorkerRow(
                id=info.id, kind=info.kind, engines=list(info.engines),
                outstanding=None if outstanding is None else outstanding.get(info.id, 0),
                models=[
                    HostedModel(m.name, m.engine, _state_name(m.state), m.inflight, m.concurrency, m.pinned, m.error)
                    for m in sorted(info.model_states, key=lambda m: m.name)
                ],
            ))
    # registered models and where they stand: the gateway's own aggregation of the workers' registrations
    entries = catalog.models({i.id: i for i in instances}, {c.name: c for c in models})
    for entry in entries.values():
        config = entry.config
        if config is None:
            continue  # a worker's built-in model: listed under its worker
        view.models.append(ModelRow(
            config.name, config.engine, config.version, config.max_batch_size, config.replicas, list(entry.instances),
            [s.id for s in entry.states if s.state == "LOADING"], [s.id for s in entry.states if s.state == "FAILED"],
        ))
    for batcher_id, answer in sorted(queues.items()):
        if isinstance(answer, str):
            continue  # reported with the batcher's health below
        for q in answer.queues:
            view.queues.append(QueueRow(
                batcher_id, q.model, q.queued, q.inflight_batches, q.max_inflight_batches, q.max_batch_size,
                round(q.max_queue_delay_ms, 3), q.max_queue_size, q.registered,
            ))
    view.problems = problems(view, queues, router_answered=outstanding is not None)
    return view


def problems(view: ClusterView, queues: dict[str, Any], router_answered: bool) -> list[str]:
    out: list[str] = []
    kinds = {s.kind for s in view.services}
    out += [f"no {kind} is registered" for kind in SERVICE_KINDS if kind not in kinds]
    out += [f"{s.kind} {s.id} ({s.grpc_address}): {s.health}" for s in view.services if s.health != SERVING]
    if "router" in kinds and not router_answered:
        out.append("no router answered ListInstances: outstanding batches unknown")
    out += [f"batcher {bid}: queues unreadable ({why})" for bid, why in sorted(queues.items()) if isinstance(why, str)]
    for worker in view.workers:
        out += [f"model {m.name} FAILED on {worker.id}: {m.error or 'no reason given'}" for m in worker.models if m.state == "FAILED"]
    for model in view.models:
        if not model.ready_on:
            if model.loading_on:
                out.append(f"model {model.name} is still LOADING on {', '.join(model.loading_on)}")
            else:
                out.append(f"model {model.name} is registered but READY on no worker")
    return out


def _kind_order(kind: str) -> int:
    return SERVICE_KINDS.index(kind) if kind in SERVICE_KINDS else len(SERVICE_KINDS)
