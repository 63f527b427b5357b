"""`unimodel status`'s plain logic: the view built from etcd's records and the services' answers, its
problems, and the table / JSON output."""

from __future__ import annotations

import json

import pytest

from unimodel.cli import COMMANDS, USAGE
from unimodel.core.kinds import SERVICE_KINDS
from unimodel.status.__main__ import main
from unimodel.status.render import render_json, render_text, table, uptime
from unimodel.status.view import SERVING, build
from unimodel.v1 import model_pb2, registry_pb2, services_pb2

READY, LOADING, FAILED = registry_pb2.ModelStatus.READY, registry_pb2.ModelStatus.LOADING, registry_pb2.ModelStatus.FAILED


def instance(kind: str, iid: str, *models: registry_pb2.ModelStatus) -> registry_pb2.InstanceInfo:
    return registry_pb2.InstanceInfo(  # as a worker registers: `models` lists those it serves now (READY)
        id=iid, kind=kind, version="0.1.0", grpc_address=f"10.0.0.1:{9000 + len(iid)}", started_unix_ms=1_000,
        host="node-a", pid=4000 + len(iid),
        engines=["onnx", "echo"] if models else [], model_states=list(models),
        models=[m.name for m in models if m.state == READY],
    )


def cluster(*workers: registry_pb2.InstanceInfo) -> list[registry_pb2.InstanceInfo]:
    others = [instance(k, f"{k}-1") for k in SERVICE_KINDS if k != "gpu-worker"]
    return [*others, *workers]


def queues(*states: services_pb2.QueueState) -> dict[str, services_pb2.ListQueuesResponse | str]:
    return {"batcher-1": services_pb2.ListQueuesResponse(instance_id="batcher-1", queues=list(states))}


MLP = model_pb2.ModelConfig(name="mlp", engine="onnx", version="1", max_batch_size=64)


def healthy_view():
    workers = [
        instance("gpu-worker", "w0", registry_pb2.ModelStatus(name="mlp", engine="onnx", state=READY, inflight=2, concurrency=1),
                 registry_pb2.ModelStatus(name="echo", engine="echo", state=READY, pinned=True, concurrency=8)),
        instance("gpu-worker", "w1",
                 registry_pb2.ModelStatus(name="echo", engine="echo", state=READY, pinned=True, concurrency=8)),
    ]
    infos = cluster(*workers)
    health = {i.id: SERVING for i in infos}
    q = services_pb2.QueueState(model="mlp", queued=3, inflight_batches=1, max_inflight_batches=2, max_batch_size=64,
                                max_queue_delay_ms=2.0, max_queue_size=1024, registered=True)
    return build("etcd:2379", infos, [MLP], health, {"w0": 2}, queues(q))


def test_a_healthy_cluster_has_no_problems_and_lists_every_part() -> None:
    view = healthy_view()
    assert view.healthy and view.problems == []
    assert [s.kind for s in view.services] == [*SERVICE_KINDS, "gpu-worker"]  # in the services' order
    w0, w1 = [w for w in view.workers if w.kind == "gpu-worker"]
    assert (w0.id, w0.outstanding, [m.name for m in w0.models]) == ("w0", 2, ["echo", "mlp"])  # models by name
    assert w1.outstanding == 0 and w0.models[1].inflight == 2
    (mlp,) = view.models
    assert (mlp.ready_on, mlp.loading_on, mlp.failed_on) == (["w0"], [], [])
    (q,) = view.queues
    assert (q.batcher, q.model, q.queued, q.inflight_batches, q.registered) == ("batcher-1", "mlp", 3, 1, True)


def test_problems_name_what_is_missing_unreachable_failed_or_not_ready() -> None:
    workers = [
        instance("gpu-worker", "w0", registry_pb2.ModelStatus(name="mlp", state=FAILED, error="no such file")),
        instance("gpu-worker", "w1", registry_pb2.ModelStatus(name="big", state=LOADING)),
    ]
    infos = [i for i in cluster(*workers) if i.kind != "cache"]
    health = {i.id: SERVING for i in infos} | {"w1": "UNREACHABLE: DEADLINE_EXCEEDED"}
    models = [MLP, model_pb2.ModelConfig(name="big", engine="onnx"), model_pb2.ModelConfig(name="gone", engine="onnx")]
    view = build("etcd:2379", infos, models, health, None, {"batcher-1": "UNREACHABLE: UNAVAILABLE"})
    assert view.problems == [
        "no cache is registered",
        "gpu-worker w1 (10.0.0.1:9002): UNREACHABLE: DEADLINE_EXCEEDED",
        "no router answered ListInstances: outstanding batches unknown",
        "batcher batcher-1: queues unreadable (UNREACHABLE: UNAVAILABLE)",
        "model mlp FAILED on w0: no such file",
        "model big is still LOADING on w1",
        "model gone is registered but READY on no worker",
        "model mlp is registered but READY on no worker",
    ]
    assert not view.healthy and view.queues == []
    assert all(w.outstanding is None for w in view.workers)  # unknown, not 0
    assert {m.name: m.failed_on for m in view.models}["mlp"] == ["w0"]


def test_text_output_is_aligned_tables_and_a_verdict() -> None:
    text = render_text(healthy_view(), now_ms=1_000 + 125_000)
    lines = text.splitlines()
    assert lines[0] == "etcd etcd:2379: 7 instances, 1 registered model"
    header = lines[lines.index("WORKERS") + 1]
    assert header.split() == [
        "ID", "KIND", "ENGINES", "OUTSTANDING", "MODEL", "ENGINE", "STATE", "INFLIGHT", "CONCURRENCY"
    ]
    w0, second = lines[lines.index("WORKERS") + 3], lines[lines.index("WORKERS") + 4]
    assert w0.split() == ["w0", "gpu-worker", "onnx,echo", "2", "echo", "echo", "READY", "(pinned)", "0", "8"]
    assert second.split() == ["mlp", "onnx", "READY", "2", "1"] and second.index("mlp") == header.index("MODEL")
    services = lines[lines.index("SERVICES") + 1:lines.index("SERVICES") + 3]
    assert services[0].split() == ["KIND", "ID", "GRPC", "HOST", "PID", "VERSION", "UP", "HEALTH"]
    assert services[1].split()[3:5] == ["node-a", str(4000 + len(services[1].split()[1]))]
    assert "2m05s" in services[1]
    assert lines[-1].startswith("healthy: ")


def test_text_output_lists_problems() -> None:
    view = build("etcd:2379", [], [], {}, None, {})
    text = render_text(view, now_ms=0)
    assert f"PROBLEMS ({len(SERVICE_KINDS)})" in text and "  no gateway is registered" in text


def test_json_output_is_the_whole_view() -> None:
    data = json.loads(render_json(healthy_view()))
    assert set(data) == {"etcd", "services", "workers", "models", "queues", "problems", "healthy"}
    assert data["healthy"] is True and data["queues"][0]["max_queue_delay_ms"] == 2.0
    assert data["workers"][1]["models"][0] == {
        "name": "echo", "engine": "echo", "state": "READY", "inflight": 0, "concurrency": 8, "pinned": True, "error": "",
    }
    gateway = data["services"][0]
    assert gateway["kind"] == "gateway" and gateway["host"] == "node-a" and gateway["pid"] == 4000 + len(gateway["id"])


@pytest.mark.parametrize(("started", "now", "shown"), [
    (0, 5, "-"), (1_000, 1_000, "0s"), (0 + 1, 59_001, "59s"), (1, 3_600_001, "1h00m"), (1, 90_000_001, "1d01h"),
])
def test_uptime(started: int, now: int, shown: str) -> None:
    assert uptime(started, now) == shown


def test_table_pads_columns_and_shows_none_as_dash() -> None:
    assert table(("A", "BB"), [("xyz", None), ("", 1)]) == ["A    BB", "xyz  -", "     1"]


def test_status_is_a_cli_command_and_refuses_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert COMMANDS["status"] == "unimodel.status.__main__" and "  status  " in USAGE
    assert main(["--timeout", "0"]) == 2
    assert "--timeout must be > 0" in capsys.readouterr().err
    assert main(["--etcd-endpoints", "no-port"]) == 2
    assert capsys.readouterr().err.startswith("unimodel status: error: etcd_endpoints: ")
