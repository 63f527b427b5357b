from __future__ import annotations

import random
from collections import Counter

from unimodel.core.routing_policy import WorkerTable
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
    status = registry_pb2.ModelStatus
    t.upsert(registry_pb2.InstanceInfo(id="a", models=["m"], model_states=[status(name="m", state=status.READY, concurrency=2)]))
    t.upsert(registry_pb2.InstanceInfo(id="b", models=["m"], model_states=[status(name="m", state=status.READY, concurrency=3)]))
    t.upsert(registry_pb2.InstanceInfo(id="c", models=["m"]))  # reports no concurrency: counts as 1
    t.upsert(registry_pb2.InstanceInfo(id="d", model_states=[status(name="m", state=status.LOADING, concurrency=4)]))
    assert t.capacity("m") == 6
    assert t.capacity("other") == 0
    t.suspend("b", 5.0)
    assert t.capacity("m") == 3
    t.remove("a")
    assert t.capacity("m") == 1


def test_an_instance_with_a_free_slot_is_preferred_to_busy_ones() -> None:
    status = registry_pb2.ModelStatus
    t = WorkerTable(random.Random(7))
    for wid in "abcd":
        t.upsert(registry_pb2.InstanceInfo(id=wid, models=["m"], model_states=[status(name="m", state=status.READY, concurrency=1)]))
    for wid in "abc":
        t.begin(wid)  # busy: one batch each, they run one at a time
    assert Counter(t.pick("m") for _ in range(200)) == {"d": 200}
    t.begin("d")
    t.begin("d")  # all busy: two random choices among all, the less loaded of the two wins
    assert "d" not in Counter(t.pick("m") for _ in range(200))
    t.end("a")  # a finished its batch: it gets the next one
    assert Counter(t.pick("m") for _ in range(200)) == {"a": 200}


def test_a_sender_picks_the_instances_where_it_has_a_free_slot_of_its_own() -> None:
    status = registry_pb2.ModelStatus
    t = WorkerTable(random.Random(3))
    for wid in "ab":
        t.upsert(registry_pb2.InstanceInfo(id=wid, models=["m"], model_states=[status(name="m", state=status.READY, concurrency=2)]))
    own = {"b": 1}  # one slot of b is this sender's; the others are other batchers'
    assert Counter(t.pick("m", own=own) for _ in range(100)) == {"b": 100}
    t.begin("b")  # its own slot is taken: the instances' free slots decide, as without `own`
    assert Counter(t.pick("m", own=own) for _ in range(100)) == {"a": 100}


def _llm_table(slots: int, workers: str = "abc") -> WorkerTable:
    status = registry_pb2.ModelStatus
    t = WorkerTable(random.Random(7))
    for wid in workers:
        t.upsert(
            registry_pb2.InstanceInfo(id=wid, models=["llm"], model_states=[status(name="llm", state=status.READY, concurrency=slots)]),
            generative={"llm"},
        )
    return t


def test_a_session_keeps_its_home_worker_while_it_has_room() -> None:
    t = _llm_table(slots=4)
    home = t.pick_affine("llm", "session-1")
    assert {t.pick_affine("llm", "session-1") for _ in range(50)} == {home}
    # sessions spread: many keys land on every worker
    assert {t.pick_affine("llm", f"s{i}") for i in range(60)} == {"a", "b", "c"}
    # the home fills up while another worker has room: the conversation moves there (load allows no more)
    t.set_load(home, "llm", 4)
    moved = t.pick_affine("llm", "session-1")
    assert moved != home and t.load(moved, "llm") < 4
    # everyone full and the home no busier than the rest: stay home (its prefix cache is warm)
    for wid in "abc":
        t.set_load(wid, "llm", 4)
    assert t.pick_affine("llm", "session-1") == home
    # home far busier than the least loaded: go elsewhere
    t.set_load(home, "llm", 9)
    assert t.pick_affine("llm", "session-1") != home


def test_generation_load_comes_from_acks_sends_and_reports() -> None:
    status = registry_pb2.ModelStatus
    t = _llm_table(slots=1, workers="ab")
    t.add_load("a", "llm", 1)  # a batch item just went to a
    assert t.pick_affine("llm", "") == "b"  # no key: the free instance
    t.set_load("a", "llm", 0)  # a's ack: its generation already ended
    t.add_load("b", "llm", 1)
    assert t.pick_affine("llm", "") == "a"
    # a registration report sets the load too (sequences running on the worker)
    t.upsert(
        registry_pb2.InstanceInfo(id="a", models=["llm"], model_states=[status(name="llm", state=status.READY, concurrency=1, inflight=3)]),
        generative={"llm"},
    )
    assert t.load("a", "llm") == 3
    t.remove("a")
    assert t.load("a", "llm") == 0 and t.pick_affine("llm", "x") == "b"
    assert t.pick_affine("nothing", "x") is None
