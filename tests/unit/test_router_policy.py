from __future__ import annotations

import random
from collections import Counter

from unimodel.router.policy import WorkerTable
from unimodel.v1 import registry_pb2


def table(*workers: tuple[str, list[str]]) -> WorkerTable:
    t = WorkerTable(random.Random(7))
    for wid, models in workers:
        t.upsert(registry_pb2.InstanceInfo(id=wid, kind="gpu-worker", models=models))
    return t


def test_candidates_by_model_and_exclusion() -> None:
    t = table(("a", ["echo"]), ("b", ["echo", "mlp"]), ("c", ["mlp"]))
    assert t.candidates("echo") == ["a", "b"]
    assert t.candidates("mlp", exclude=["b"]) == ["c"]
    assert t.pick("nothing") is None
    assert t.pick("echo", exclude=["a", "b"]) is None


def test_power_of_two_prefers_less_outstanding() -> None:
    t = table(("a", ["m"]), ("b", ["m"]))
    for _ in range(5):
        t.begin("a")
    assert Counter(t.pick("m") for _ in range(100)) == {"b": 100}


def test_spreads_evenly_when_idle() -> None:
    t = table(("a", ["m"]), ("b", ["m"]), ("c", ["m"]))
    counts = Counter(t.pick("m") for _ in range(3000))
    assert set(counts) == {"a", "b", "c"} and min(counts.values()) > 800


def test_remove_forgets_instance_and_load() -> None:
    t = table(("a", ["m"]), ("b", ["m"]))
    t.begin("a")
    t.remove("a")
    assert t.candidates("m") == ["b"] and "a" not in t.outstanding
    t.end("a")  # a late reply from a removed instance is harmless
    assert t.pick("m") == "b"


def test_suspended_instance_gets_no_traffic_until_cooldown_ends() -> None:
    now = [100.0]
    t = WorkerTable(random.Random(1), clock=lambda: now[0])
    for wid in ("a", "b"):
        t.upsert(registry_pb2.InstanceInfo(id=wid, models=["m"]))
    assert t.suspend("a", 2.0) is True
    assert t.suspend("a", 2.0) is False  # already suspended: the caller logs once
    assert {t.pick("m") for _ in range(50)} == {"b"}
    now[0] += 2.5
    assert {t.pick("m") for _ in range(50)} == {"a", "b"}


def test_suspended_instances_are_used_when_nothing_else_is_left() -> None:
    t = table(("a", ["m"]))
    t.suspend("a", 60)
    assert t.pick("m") == "a"
    assert t.suspend("unknown", 1) is False


def test_capacity_sums_the_concurrency_of_ready_unsuspended_instances() -> None:
    t = WorkerTable(random.Random(7), clock=lambda: 100.0)
    S = registry_pb2.ModelStatus
    t.upsert(registry_pb2.InstanceInfo(id="a", models=["m"], model_states=[S(name="m", state=S.READY, concurrency=2)]))
    t.upsert(registry_pb2.InstanceInfo(id="b", models=["m"], model_states=[S(name="m", state=S.READY, concurrency=3)]))
    t.upsert(registry_pb2.InstanceInfo(id="c", models=["m"]))  # reports no concurrency: counts as 1
    t.upsert(registry_pb2.InstanceInfo(id="d", model_states=[S(name="m", state=S.LOADING, concurrency=4)]))
    assert t.capacity("m") == 6
    assert t.capacity("other") == 0
    t.suspend("b", 5.0)
    assert t.capacity("m") == 3
    t.remove("a")
    assert t.capacity("m") == 1


def test_an_instance_with_a_free_slot_is_preferred_to_busy_ones() -> None:
    S = registry_pb2.ModelStatus
    t = WorkerTable(random.Random(7))
    for wid in "abcd":
        t.upsert(registry_pb2.InstanceInfo(id=wid, models=["m"], model_states=[S(name="m", state=S.READY, concurrency=1)]))
    for wid in "abc":
        t.begin(wid)  # busy: one batch each, they run one at a time
    assert Counter(t.pick("m") for _ in range(200)) == {"d": 200}
    t.begin("d")
    t.begin("d")  # all busy: two random choices among all, the less loaded of the two wins
    assert "d" not in Counter(t.pick("m") for _ in range(200))
    t.end("a")  # a finished its batch: it gets the next one
    assert Counter(t.pick("m") for _ in range(200)) == {"a": 200}
