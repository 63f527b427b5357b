"""Routing policy, free of transports: which worker instance serves a batch of a model.

Least outstanding work with the power of two choices: sample two candidates, take the one with fewer
batches in flight (ties broken at random). Cheap, and avoids the herd effect of always taking the
global minimum from a stale view. Candidates with a free slot (outstanding below the concurrency they
announce for the model) are sampled first, so a batch never waits behind a busy instance while another
idles.

Generation batches (LLM models) are split per item: each conversation has a home instance, the
highest-ranked by rendezvous hashing of its affinity key (session), and goes there while the home has a
free sequence slot, or while every instance is full and the home is not much busier than the least
loaded one; otherwise to the least loaded instance. Load there is sequences generating (the worker's
BatchAck.load and its registration), not batches in flight: a worker acknowledges a generation batch as
soon as it started it.

An instance that failed to answer (its NATS subscription is gone, e.g. the process died and its lease
has not expired yet) is suspended for a cool-down: it gets traffic only if no other candidate exists.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Collection, Mapping

from unimodel.v1 import registry_pb2


class WorkerTable:
    def __init__(self, rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.instances: dict[str, registry_pb2.InstanceInfo] = {}
        self.outstanding: dict[str, int] = {}
        self.suspended: dict[str, float] = {}  # instance id -> suspended until (clock time)
        self.clock = clock
        self._by_model: dict[str, list[str]] = {}
        self._concurrency: dict[tuple[str, str], int] = {}  # (instance, model) -> batches it runs at once
        self.sequences: dict[tuple[str, str], int] = {}  # (instance, model) -> generations running (LLM models)
        self.rng = rng or random.Random()

    def upsert(self, info: registry_pb2.InstanceInfo, generative: Collection[str] = ()) -> None:
        """Add or update an instance; for the `generative` models its reported in-flight count becomes
        its sequence load (until the next ack or report)."""
        self.instances[info.id] = info
        self.outstanding.setdefault(info.id, 0)
        for status in info.model_states:
            if status.name in generative:
                self.sequences[(info.id, status.name)] = status.inflight
        self._reindex()

    def remove(self, instance_id: str) -> None:
        self.instances.pop(instance_id, None)
        self.outstanding.pop(instance_id, None)
        self.suspended.pop(instance_id, None)
        self._reindex()

    def suspend(self, instance_id: str, for_s: float) -> bool:
        """Take an instance out of rotation for `for_s`; True if it was not suspended already."""
        if instance_id not in self.instances:
            return False
        fresh = not self.is_suspended(instance_id)
        self.suspended[instance_id] = self.clock() + for_s
        return fresh

    def is_suspended(self, instance_id: str) -> bool:
        until = self.suspended.get(instance_id)
        if until is None:
            return False
        if self.clock() >= until:
            del self.suspended[instance_id]
            return False
        return True

    def _reindex(self) -> None:
        by_model: dict[str, list[str]] = {}
        concurrency: dict[tuple[str, str], int] = {}
        for iid in sorted(self.instances):
            info = self.instances[iid]
            for model in info.models:
                by_model.setdefault(model, []).append(iid)
            for status in info.model_states:
                concurrency[(iid, status.name)] = status.concurrency
        self._by_model = by_model
        self._concurrency = concurrency
        live = set(self.instances)
        self.sequences = {k: v for k, v in self.sequences.items() if k[0] in live}

    def models(self) -> dict[str, list[str]]:
        return {m: list(ids) for m, ids in self._by_model.items()}

    def serves(self, model: str) -> bool:
        """Whether some known instance hosts `model`."""
        return model in self._by_model

    def candidates(self, model: str, exclude: Collection[str] = ()) -> list[str]:
        """Instances hosting `model`, minus `exclude`; suspended ones only when nothing else is left."""
        hosts = [iid for iid in self._by_model.get(model, ()) if iid not in exclude]
        healthy = [iid for iid in hosts if not self.is_suspended(iid)]
        return healthy or hosts

    def slots(self, instance_id: str, model: str) -> int:
        """Batches of `model` the instance runs at once (its ModelStatus.concurrency; 1 if it reports none)."""
        return max(1, self._concurrency.get((instance_id, model), 1))

    def capacity(self, model: str) -> int:
        """Batches of `model` its READY, unsuspended instances run at once; 0 when no instance hosts it."""
        return sum(self.slots(iid, model) for iid in self.candidates(model))

    def pick(self, model: str, exclude: Collection[str] = (), own: Mapping[str, int] | None = None) -> str | None:
        """`own`: the slots of each instance that are the sender's (core/capacity_shares.py `owned`), where
        several senders share the instances; an instance is free while the sender's outstanding batches on it
        are below them."""
        cands = self.candidates(model, exclude)
        if not cands:
            return None
        # Instances with a free slot (fewer batches outstanding than they run at once) come first: with a
        # few workers, two random choices would otherwise often queue a batch behind a busy instance
        # while another one idles.
        outstanding = self.outstanding
        free = [c for c in cands if outstanding.get(c, 0) < own.get(c, 0)] if own else []
        if not free:
            free = [c for c in cands if outstanding.get(c, 0) < self.slots(c, model)]
        if free:
            cands = free
        if len(cands) == 1:
            return cands[0]
        a, b = self.rng.sample(cands, 2)
        la, lb = self.outstanding.get(a, 0), self.outstanding.get(b, 0)
        if la == lb:
            return self.rng.choice((a, b))
        return a if la < lb else b

    # generation (LLM) batches -------------------------------------------------------------------
    def load(self, instance_id: str, model: str) -> int:
        """Sequences of `model` generating on the instance (router's latest view)."""
        return self.sequences.get((instance_id, model), 0)

    def set_load(self, instance_id: str, model: str, sequences: int) -> None:
        if instance_id in self.instances:
            self.sequences[(instance_id, model)] = max(0, sequences)

    def add_load(self, instance_id: str, model: str, n: int) -> None:
        if instance_id in self.instances:
            key = (instance_id, model)
            self.sequences[key] = max(0, self.sequences.get(key, 0) + n)

    def pick_affine(self, model: str, key: str, exclude: Collection[str] = ()) -> str | None:
        """The instance for one generation with affinity key `key` (see the module doc)."""
        cands = self.candidates(model, exclude)
        if not cands:
            return None
        if len(cands) == 1:
            return cands[0]
        load = self.load
        if key:
            home = max(cands, key=lambda c: _weight(key, c))
            home_load, home_slots = load(home, model), self.slots(home, model)
            if home_load < home_slots:
                return home
            least = min(load(c, model) for c in cands)
            any_free = any(load(c, model) < self.slots(c, model) for c in cands)
            if not any_free and home_load - least <= max(1, home_slots // 4):
                return home
        free = [c for c in cands if load(c, model) < self.slots(c, model)]
        pool = free or cands
        if len(pool) == 1:
            return pool[0]
        a, b = self.rng.sample(pool, 2)
        la, lb = load(a, model) / self.slots(a, model), load(b, model) / self.slots(b, model)
        if la == lb:
            return self.rng.choice((a, b))
        return a if la < lb else b

    def begin(self, instance_id: str) -> None:
        if instance_id in self.outstanding:
            self.outstanding[instance_id] += 1

    def end(self, instance_id: str) -> None:
        if self.outstanding.get(instance_id, 0) > 0:
            self.outstanding[instance_id] -= 1


def _weight(key: str, instance_id: str) -> int:
    """Rendezvous-hash weight of (affinity key, instance): the key's home is the instance with the highest."""
    return int.from_bytes(hashlib.blake2b(f"{key}\0{instance_id}".encode(), digest_size=8).digest(), "big")
