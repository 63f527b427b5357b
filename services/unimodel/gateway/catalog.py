"""The gateway's view of the cluster from etcd instances: which models exist, whether it can serve."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from unimodel.v1 import registry_pb2

WORKER_KINDS = ("gpu-worker", "embedding-worker")
REQUIRED_KINDS = ("router", "batcher")


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str
    instances: tuple[str, ...]


def models(instances: Mapping[str, registry_pb2.InstanceInfo]) -> dict[str, ModelEntry]:
    by_model: dict[str, list[str]] = {}
    for info in instances.values():
        if info.kind in WORKER_KINDS:
            for model in info.models:
                by_model.setdefault(model, []).append(info.id)
    return {m: ModelEntry(m, tuple(sorted(ids))) for m, ids in sorted(by_model.items())}


def kinds_present(instances: Mapping[str, registry_pb2.InstanceInfo]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for info in instances.values():
        counts[info.kind] = counts.get(info.kind, 0) + 1
    return counts


def readiness(
    instances: Mapping[str, registry_pb2.InstanceInfo], nats_connected: bool, discovery_synced: bool
) -> dict[str, bool]:
    """Named checks; the cluster can serve when all are true."""
    kinds = kinds_present(instances)
    checks = {"nats": nats_connected, "etcd": discovery_synced}
    for kind in REQUIRED_KINDS:
        checks[kind] = kinds.get(kind, 0) > 0
    checks["models"] = bool(models(instances))
    return checks
