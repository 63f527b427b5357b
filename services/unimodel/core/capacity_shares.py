"""How batcher replicas share a model's slots, free of transports.

A model's *slots* are the batches its READY instances run at once (the sum of their
ModelStatus.concurrency; the router's BatchAck.capacity). Each batcher keeps at most its *share* in
flight, so that all batchers together never put more batches on the workers than the slots, however
many batchers there are:

- the router ranks the batchers it knows (their etcd registrations, the sender included) for each model:
  sorted ids, rotated by a hash of the model's name so that different models give their spare slots to
  different batchers (`rank`);
- with S slots and B batchers each batcher gets S // B, and the S % B batchers of lowest rank one more
  (`share`): the shares add up to S exactly;
- with fewer slots than batchers (S // B == 0) a fixed split would leave B - S batchers with nothing, and
  their requests waiting forever; so the S slots go round: in each turn of ROTATION_S seconds of wall
  clock, S consecutive ranks have one slot each, the next turn the window moves on by one rank. A batcher
  waits at most (B - 1) turns for its own.

Which slots: a batcher that sends batches straight to the workers (core/dispatch.py) also knows *which* of
the slots are its own (`owned`): the slots in a fixed order (instances by sorted id, each one's slots
in a row), and slot j belongs to the batcher of rank (j + turn) % B, so consecutive slots of an instance go
to different batchers and a batcher's slots are spread over the instances. Every batcher computes the same
split from the same routing table, so two batchers never pick the same free slot.

While the batchers' views differ (one joined or left, a turn changes while a batch still runs) the sum
can exceed S for a moment; the workers refuse a batch that finds its model's slots all taken
(BatchAck.busy) and the batcher sends it again shortly (batcher/service.py), so the limit holds anyway.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable

ROTATION_S = 0.05
"""Length of one turn when a model has fewer slots than batchers (wall clock, the same for every batcher
on one host; across hosts, clocks synchronised to a few ms keep turns apart, and the workers' busy
refusals cover the rest)."""


def rank(batchers: Iterable[str], me: str, model: str) -> tuple[int, int]:
    """(`me`'s rank for `model`, number of batchers), `me` counted even when not (yet) in `batchers`."""
    ids = sorted(set(batchers) | {me})
    n = len(ids)
    offset = zlib.crc32(model.encode()) % n
    return (ids.index(me) - offset) % n, n


def share(slots: int, batchers: int, rank_: int, now: float) -> int:
    """Batches of the model the batcher of rank `rank_` may keep in flight at wall-clock time `now`.
    `batchers` <= 0 (the router knows no batcher: an old router, or a batch not sent by a batcher)
    gives the whole capacity; `slots` <= 0 (no instance known) gives 1, so the batch that finds out goes."""
    if slots <= 0:
        return 1
    if batchers <= 0:
        return slots
    base, extra = divmod(slots, batchers)
    turn = int(now // ROTATION_S) if base == 0 else 0
    return base + (1 if (rank_ - turn) % batchers < extra else 0)


def next_turn(slots: int, batchers: int, now: float) -> float | None:
    """When the shares next change on their own (the next turn), or None when they are fixed."""
    if slots <= 0 or batchers <= 0 or slots >= batchers:
        return None
    return (math.floor(now / ROTATION_S) + 1) * ROTATION_S


def owned(slots: Iterable[tuple[str, int]], batchers: int, rank_: int, now: float) -> dict[str, int]:
    """How many of each instance's slots (`slots`: (instance, its slots of the model)) are the batcher of rank
    `rank_`'s at wall-clock time `now` (see the module doc); the counts add up to `share` of the total.
    `batchers` <= 0: every slot."""
    order = sorted(slots)
    if batchers <= 0:
        return {instance: n for instance, n in order if n > 0}
    total = sum(n for _, n in order)
    turn = int(now // ROTATION_S) if total < batchers else 0
    out: dict[str, int] = {}
    j = 0
    for instance, n in order:
        for _ in range(n):
            if (j + turn) % batchers == rank_:
                out[instance] = out.get(instance, 0) + 1
            j += 1
    return out
