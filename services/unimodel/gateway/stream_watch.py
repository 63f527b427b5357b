"""Which workers the gateway's running generations depend on, and which of them to check.

A generation is acknowledged by its worker once (chunk seq 0), then only its chunks say the worker is
alive. If the worker's process dies, nothing else arrives: without a check the client would wait for
the generation's deadline. So the gateway keeps the running generations by worker and, for a worker
whose generations have all been silent for `silence_s` (or whose registration left etcd), asks NATS
whether the worker is still subscribed: "no responders" means its connection is gone, and its
generations are ended at once (they move to another worker, or end with an error that says so: an SSE
error event, a gRPC status). A worker that answers keeps its generations; one that does not answer
either keeps them until they have been silent for the liveness interval (a worker cut off from the
network stays subscribed in NATS until the server's pings give up, minutes later). Plain logic: the
probe is injected.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Protocol


class Watched(Protocol):
    @property
    def worker_id(self) -> str: ...
    @property
    def last_seen(self) -> float:
        """perf_counter() of its last message from the worker."""

    def worker_lost(self, reason: str) -> None: ...


class StreamWatch:
    def __init__(self, silence_s: float = 1.0, clock: Callable[[], float] = time.perf_counter) -> None:
        self.silence_s = silence_s
        self.clock = clock
        self._by_worker: dict[str, set[Watched]] = {}

    def __len__(self) -> int:
        return sum(len(g) for g in self._by_worker.values())

    def add(self, gen: Watched) -> None:
        if gen.worker_id:
            self._by_worker.setdefault(gen.worker_id, set()).add(gen)

    def discard(self, gen: Watched, worker_id: str = "") -> None:
        """Forget `gen` (on `worker_id`, default: its current worker)."""
        worker_id = worker_id or gen.worker_id
        gens = self._by_worker.get(worker_id)
        if gens is not None:
            gens.discard(gen)
            if not gens:
                del self._by_worker[worker_id]

    def workers(self) -> list[str]:
        return list(self._by_worker)

    def silent_workers(self) -> list[str]:
        """Workers none of whose generations has heard from them for `silence_s`: worth a probe."""
        limit = self.clock() - self.silence_s
        return [w for w, gens in self._by_worker.items() if all(g.last_seen <= limit for g in gens)]

    def silence(self, worker_id: str) -> float:
        """Seconds since any generation on `worker_id` heard from it (0 when it has none)."""
        gens = self._by_worker.get(worker_id)
        if not gens:
            return 0.0
        return self.clock() - max(g.last_seen for g in gens)

    def silent_since(self, moment: float, silence_s: float) -> list[Watched]:
        """Generations that heard nothing from their worker since `moment` (clock time) and for at least
        `silence_s`: after a NATS reconnect, their chunks may have been lost on the way."""
        limit = min(moment, self.clock() - silence_s)
        return [g for gens in self._by_worker.values() for g in gens if g.last_seen <= limit]

    def lost(self, worker_id: str, reason: str) -> int:
        """End every generation on `worker_id` with `reason`; returns how many."""
        gens: Iterable[Watched] = self._by_worker.pop(worker_id, set())
        n = 0
        for gen in list(gens):
            gen.worker_lost(reason)
            n += 1
        return n
