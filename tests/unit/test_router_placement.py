"""Model placement: capable workers, replicas by rendezvous hashing, idempotent commands."""

from unimodel.router.placement import Planner, capable, place
from unimodel.v1 import model_pb2, registry_pb2

State = registry_pb2.ModelStatus.State


def worker(wid: str, engines=("onnx", "delay"), states=(), cuda: bool = False) -> registry_pb2.InstanceInfo:
    info = registry_pb2.InstanceInfo(id=wid, kind="gpu-worker", engines=list(engines))
    if cuda:
        info.labels["cuda"] = "true"
    for name, state, *rest in states:
        info.model_states.add(name=name, state=state, pinned=bool(rest and rest[0]))
    return info


def config(name: str, engine: str = "onnx", replicas: int = 0, provider: str = "auto") -> model_pb2.ModelConfig:
    return model_pb2.ModelConfig(name=name, engine=engine, replicas=replicas, execution_provider=provider)


def test_every_capable_worker_by_default_and_engines_respected() -> None:
    workers = {w.id: w for w in (worker("a"), worker("b"), worker("c", engines=("echo",)))}
    desired = place({"m": config("m")}, workers)
    assert desired == {"a": {"m"}, "b": {"m"}, "c": set()}


def test_cuda_models_only_on_cuda_workers() -> None:
    assert not capable(config("m", provider="cuda"), worker("a"))
    assert capable(config("m", provider="cuda"), worker("a", cuda=True))


def test_replicas_are_stable_and_move_only_from_a_leaving_worker() -> None:
    workers = {w: worker(w) for w in "abcdef"}
    configs = {f"m{i}": config(f"m{i}", replicas=2) for i in range(30)}
    before = place(configs, workers)
    for name in configs:
        assert sum(name in models for models in before.values()) == 2
    assert len({w for w, models in before.items() if models}) > 3  # spread, not all on one worker
    del workers["c"]
    after = place(configs, workers)
    for name in configs:
        hosts_before = {w for w, models in before.items() if name in models}
        hosts_after = {w for w, models in after.items() if name in models}
        assert len(hosts_after) == 2
        if "c" not in hosts_before:
            assert hosts_after == hosts_before


def test_planner_loads_once_retries_failures_and_unloads_unregistered() -> None:
    planner = Planner(retry_failed_s=10)
    configs = {"m": config("m")}
    workers = {"a": worker("a")}
    cmds = planner.plan(configs, workers, now=0)
    assert [(c.worker_id, c.model, c.load is not None) for c in cmds] == [("a", "m", True)]
    planner.sent(cmds[0], 0)
    assert planner.plan(configs, workers, now=1) == []  # asked recently, registration not updated yet
    workers = {"a": worker("a", states=[("m", State.LOADING)])}
    assert planner.plan(configs, workers, now=2) == []
    workers = {"a": worker("a", states=[("m", State.FAILED)])}
    assert planner.plan(configs, workers, now=3) == []
    assert len(planner.plan(configs, workers, now=11)) == 1  # a failed load is retried after a while
    # A changed config reloads.
    workers = {"a": worker("a", states=[("m", State.READY)])}
    assert planner.plan(configs, workers, now=13) == []
    changed = {"m": config("m")}
    changed["m"].max_batch_size = 8
    assert [c.load.max_batch_size for c in planner.plan(changed, workers, now=14)] == [8]
    # Unregistered: unload; pinned models are left alone.
    workers = {"a": worker("a", states=[("m", State.READY), ("echo", State.READY, True)])}
    cmds = planner.plan({}, workers, now=20)
    assert [(c.model, c.load) for c in cmds] == [("m", None)]
    planner.sent(cmds[0], 20)
    assert planner.plan({}, workers, now=21) == []


def test_a_command_that_did_not_reach_the_worker_is_sent_again() -> None:
    planner = Planner()
    configs, workers = {"m": config("m")}, {"a": worker("a")}
    (cmd,) = planner.plan(configs, workers, now=0)
    planner.sent(cmd, 0)
    planner.failed(cmd)
    assert len(planner.plan(configs, workers, now=0.5)) == 1


def test_text_embedding_models_go_to_embedding_workers_when_there_are_any() -> None:
    embedder = registry_pb2.InstanceInfo(id="e", kind="embedding-worker", engines=["onnx"])
    emb = config("minilm")
    emb.processing.kind = "text-embedding"
    other = config("mlp")
    workers = {w.id: w for w in (worker("a"), embedder)}
    assert place({"minilm": emb, "mlp": other}, workers) == {"a": {"mlp"}, "e": {"minilm"}}
    # no embedding-worker: the gpu-workers embed
    assert place({"minilm": emb}, {"a": worker("a")}) == {"a": {"minilm"}}
    assert not capable(other, embedder)
