"""Model placement, free of transports: which workers should host each registered model, and which
load / unload commands bring the workers there.

Every capable worker hosts a model by default (text-embedding models: every capable embedding-worker,
when there is one; an embedding-worker hosts nothing else); with `replicas: n` the n workers ranked highest by
rendezvous hashing (highest random weight) of (model, worker) do. The ranking needs no coordination:
every router replica computes the same placement from the same etcd view, and when a worker leaves only
its models move (to the next-ranked worker). Commands are idempotent on the worker, so two routers
sending the same one is harmless.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from unimodel.core.kinds import EMBEDDING_WORKER
from unimodel.core.modelconfig import TEXT_EMBEDDING
from unimodel.v1 import model_pb2, registry_pb2

State = registry_pb2.ModelStatus.State


def capable(config: model_pb2.ModelConfig, worker: registry_pb2.InstanceInfo) -> bool:
    if config.engine not in worker.engines:
        return False
    if worker.kind == EMBEDDING_WORKER and config.processing.kind != TEXT_EMBEDDING:
        return False
    if config.execution_provider == "cuda":
        cuda: str | None = worker.labels.get("cuda")  # a protobuf map (the runtime ships no type information)
        return cuda == "true"
    return True


def _weight(model: str, worker_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{model}\0{worker_id}".encode(), digest_size=8).digest(), "big")


def place(
    configs: Mapping[str, model_pb2.ModelConfig], workers: Mapping[str, registry_pb2.InstanceInfo]
) -> dict[str, set[str]]:
    """Desired models per worker id (every worker appears, possibly with an empty set)."""
    desired: dict[str, set[str]] = {wid: set() for wid in workers}
    for name, config in configs.items():
        hosts = [wid for wid, info in workers.items() if capable(config, info)]
        if config.processing.kind == TEXT_EMBEDDING:  # on embedding-workers when there are any
            dedicated = [wid for wid in hosts if workers[wid].kind == EMBEDDING_WORKER]
            hosts = dedicated or hosts
        if config.replicas > 0:
            hosts = sorted(hosts, key=lambda wid: _weight(name, wid), reverse=True)[: config.replicas]
        for wid in hosts:
            desired[wid].add(name)
    return desired


def digest(config: model_pb2.ModelConfig) -> str:
    return hashlib.blake2b(config.SerializeToString(deterministic=True), digest_size=12).hexdigest()


@dataclass(frozen=True, slots=True)
class Command:
    worker_id: str
    model: str
    load: model_pb2.ModelConfig | None  # None: unload

    def __str__(self) -> str:
        return f"{'load' if self.load is not None else 'unload'} {self.model} on {self.worker_id}"


class Planner:
    """Turns desired placement + what workers report into commands; remembers what it asked for, so
    it asks again only when the config changed, the worker lost the model or a load failed (after
    `retry_failed_s`)."""

    def __init__(self, retry_failed_s: float = 10.0) -> None:
        self.retry_failed_s = retry_failed_s
        self._sent: dict[tuple[str, str], tuple[str, float]] = {}  # (worker, model) -> (digest|"unload", at)

    def plan(
        self,
        configs: Mapping[str, model_pb2.ModelConfig],
        workers: Mapping[str, registry_pb2.InstanceInfo],
        now: float,
    ) -> list[Command]:
        desired = place(configs, workers)
        commands: list[Command] = []
        for wid, info in sorted(workers.items()):
            states = {s.name: s for s in info.model_states}
            for name in sorted(desired[wid]):
                config = configs[name]
                want = digest(config)
                status = states.get(name)
                sent = self._sent.get((wid, name))
                if status is not None and status.state in (State.READY, State.LOADING) and sent is None:
                    # Hosted before this router knew (restart, or another router placed it): trust the
                    # worker's idempotence and send once so a changed config reloads.
                    pass
                elif status is not None and status.state in (State.READY, State.LOADING) and sent is not None and sent[0] == want:
                    continue
                elif status is not None and status.state == State.FAILED and sent is not None and sent[0] == want:
                    if now - sent[1] < self.retry_failed_s:
                        continue
                elif status is None and sent is not None and sent[0] == want and now - sent[1] < self.retry_failed_s:
                    continue  # asked recently; the worker's registration has not caught up yet
                commands.append(Command(wid, name, config))
            for name, status in sorted(states.items()):
                if status.pinned or name in desired[wid] or status.state == State.UNLOADING:
                    continue
                sent = self._sent.get((wid, name))
                if sent is not None and sent[0] == "unload" and now - sent[1] < self.retry_failed_s:
                    continue
                commands.append(Command(wid, name, None))
        for key in [k for k in self._sent if k[0] not in workers]:
            del self._sent[key]
        return commands

    def sent(self, command: Command, now: float) -> None:
        mark = digest(command.load) if command.load is not None else "unload"
        self._sent[(command.worker_id, command.model)] = (mark, now)

    def failed(self, command: Command) -> None:
        """The command did not reach the worker: forget it, so the next plan sends it again."""
        self._sent.pop((command.worker_id, command.model), None)
