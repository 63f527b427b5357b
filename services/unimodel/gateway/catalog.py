"""The gateway's view of the cluster from etcd: registered models (desired state), the workers that
host them and in which state, whether the cluster can serve. Plain logic, no transport."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from unimodel.core.kinds import WORKER_KINDS
from unimodel.v1 import model_pb2, registry_pb2

REQUIRED_KINDS = ("router", "batcher")
State = registry_pb2.ModelStatus.State


@dataclass(frozen=True, slots=True)
class InstanceState:
    id: str
    state: str  # LOADING / READY / FAILED / UNLOADING
    error: str = ""
    inflight: int = 0
    engine: str = ""  # as the instance reports it ("" from a worker that does not say)


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str
    instances: tuple[str, ...]  # instances that serve it now (READY)
    config: model_pb2.ModelConfig | None = None  # None: not registered (a worker's built-in model)
    states: tuple[InstanceState, ...] = field(default=())

    @property
    def registered(self) -> bool:
        return self.config is not None

    @property
    def state(self) -> str:
        """READY when an instance serves it; LOADING while one loads it (or none was placed yet);
        FAILED when every instance that tried failed; UNAVAILABLE for a built-in model on no instance."""
        if self.instances:
            return "READY"
        states = {s.state for s in self.states}
        if "LOADING" in states:
            return "LOADING"
        if states and states <= {"FAILED"}:
            return "FAILED"
        return "LOADING" if self.registered else "UNAVAILABLE"

    @property
    def engine(self) -> str:
        """The registered config's engine; for a worker's built-in model, the engine its instances report
        (a READY instance's first); "" when none says."""
        if self.config is not None:
            return self.config.engine
        for state in sorted(self.states, key=lambda s: s.state != "READY"):
            if state.engine:
                return state.engine
        return ""

    def errors(self) -> list[str]:
        return sorted({s.error for s in self.states if s.state == "FAILED" and s.error})


def models(
    instances: Mapping[str, registry_pb2.InstanceInfo],
    configs: Mapping[str, model_pb2.ModelConfig] | None = None,
) -> dict[str, ModelEntry]:
    """Every model that is registered or hosted by a worker, by name."""
    configs = configs or {}
    ready: dict[str, list[str]] = {}
    states: dict[str, list[InstanceState]] = {}
    for info in instances.values():
        if info.kind not in WORKER_KINDS:
            continue
        for model in info.models:
            ready.setdefault(model, []).append(info.id)
        reported = {s.name for s in info.model_states}
        for s in info.model_states:
            states.setdefault(s.name, []).append(InstanceState(info.id, State.Name(s.state), s.error, s.inflight, s.engine))
        for model in info.models:  # a worker that reports no states still serves its models
            if model not in reported:
                states.setdefault(model, []).append(InstanceState(info.id, "READY"))
    names = sorted(set(ready) | set(configs))
    return {
        m: ModelEntry(
            m, tuple(sorted(ready.get(m, ()))), configs.get(m), tuple(sorted(states.get(m, ()), key=lambda s: s.id))
        )
        for m in names
    }


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
    checks["models"] = any(e.instances for e in models(instances).values())
    return checks
