"""How batcher replicas share a model's slots (core/capacity_shares.py): never more than the slots in all."""

from __future__ import annotations

import itertools

import pytest

from unimodel.core import capacity_shares
from unimodel.core.capacity_shares import ROTATION_S, next_turn, rank, share

IDS = ["batcher-a", "batcher-b", "batcher-c", "batcher-d"]


def ranks(n: int, model: str) -> list[int]:
    return [rank(IDS[:n], me, model)[0] for me in IDS[:n]]


@pytest.mark.parametrize("model", ["mlp", "delay", "resnet"])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_ranks_are_a_permutation_and_the_same_whatever_the_order_the_batchers_were_seen_in(model: str, n: int) -> None:
    assert sorted(ranks(n, model)) == list(range(n))
    for order in itertools.permutations(IDS[:n]):
        assert [rank(order, me, model) for me in IDS[:n]] == [(r, n) for r in ranks(n, model)]


def test_a_batcher_not_yet_registered_counts_itself() -> None:
    assert rank(["batcher-a"], "batcher-z", "m")[1] == 2
    assert rank([], "batcher-z", "m") == (0, 1)


def test_models_give_their_spare_slots_to_different_batchers() -> None:
    first = {ranks(3, f"model-{i}").index(0) for i in range(30)}
    assert len(first) == 3


@pytest.mark.parametrize(("slots", "n"), [(s, n) for s in range(1, 13) for n in range(1, 5)])
def test_the_shares_add_up_to_the_slots_at_every_moment(slots: int, n: int) -> None:
    for step in range(3 * n):
        now = 1_000_000.0 + step * ROTATION_S + ROTATION_S / 2
        shares = [share(slots, n, r, now) for r in range(n)]
        assert sum(shares) == slots
        if slots >= n:
            assert min(shares) >= 1 and max(shares) - min(shares) <= 1
            assert next_turn(slots, n, now) is None  # fixed shares
        else:
            assert set(shares) <= {0, 1}


@pytest.mark.parametrize(("slots", "n"), [(1, 2), (1, 3), (2, 3), (1, 4), (3, 4)])
def test_with_fewer_slots_than_batchers_every_batcher_gets_its_turn(slots: int, n: int) -> None:
    start = 5_000.0
    had = [0] * n
    for step in range(n):
        now = start + step * ROTATION_S + 0.001
        for r in range(n):
            had[r] += share(slots, n, r, now)
        at = next_turn(slots, n, now)
        assert at is not None and now < at <= now + ROTATION_S
    assert had == [slots] * n  # within n turns each batcher had a slot exactly `slots` times


def test_no_slots_known_or_no_batchers_named() -> None:
    assert share(0, 3, 1, 0.0) == 1  # no instance known yet: the batch that finds out goes
    assert share(5, 0, 0, 0.0) == 5  # a router that names no batchers: the whole capacity
    assert next_turn(0, 3, 0.0) is None and next_turn(5, 0, 0.0) is None
    assert capacity_shares.ROTATION_S > 0


@pytest.mark.parametrize("slots", [[("w0", 2), ("w1", 2)], [("w0", 1)], [("w0", 3), ("w1", 1)], [("w0", 1), ("w1", 1), ("w2", 4)]])
@pytest.mark.parametrize("batchers", [1, 2, 3, 5])
@pytest.mark.parametrize("now", [0.0, ROTATION_S * 1.5, ROTATION_S * 7.2])
def test_owned_slots_split_every_instance_exactly_and_match_the_shares(slots: list[tuple[str, int]], batchers: int, now: float) -> None:
    total = sum(n for _, n in slots)
    owned = [capacity_shares.owned(slots, batchers, r, now) for r in range(batchers)]
    assert [sum(o.values()) for o in owned] == [share(total, batchers, r, now) for r in range(batchers)]
    for instance, n in slots:  # every slot of every instance belongs to exactly one batcher
        assert sum(o.get(instance, 0) for o in owned) == n


def test_owned_slots_are_spread_over_the_instances() -> None:
    # 2 workers x 2 slots, 2 batchers: one slot on each worker each, not both slots of one worker
    assert [capacity_shares.owned([("w1", 2), ("w0", 2)], 2, r, 0.0) for r in range(2)] == [{"w0": 1, "w1": 1}] * 2
    assert capacity_shares.owned([("w0", 2)], 0, 0, 0.0) == {"w0": 2}  # no batchers known: every slot
