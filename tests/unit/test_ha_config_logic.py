"""`unimodel up --ha`'s configuration, as plain logic: a NATS cluster node's configuration file
(core/nats_config.render_cluster_node), an etcd member's flags (local/procs.etcd_member_flags,
etcd_initial_cluster), the fixed ports (local/cluster.HaPorts) and the --ha options; and how the path watch
reports a peer that reconnected to another NATS node (core/path_watch.py), and the gateway sending a
request again while no batcher is subscribed (core/replies.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers.deploy_checks import compose, unimodel_services
from unimodel.core import nats_config
from unimodel.core.nats_config import ClusterNode, render_cluster_node
from unimodel.core.path_watch import PathWatch
from unimodel.local import binaries
from unimodel.local.cluster import HaPorts, parse_args
from unimodel.local.procs import etcd_initial_cluster, etcd_member_flags

NODES = [ClusterNode(f"nats-{i}", "127.0.0.1", 6222 + i) for i in range(3)]


def _peers(i: int) -> list[ClusterNode]:
    return [n for n in NODES if n is not NODES[i]]


def test_cluster_node_config_includes_the_users_and_routes_to_the_other_nodes() -> None:
    text = render_cluster_node(NODES[1], _peers(1), "nats-server.conf")
    lines = text.splitlines()
    assert 'include "nats-server.conf"' in lines
    assert 'server_name: "nats-1"' in lines
    assert '  name: "unimodel"' in lines
    assert '  listen: "127.0.0.1:6223"' in lines
    assert '  routes: ["nats-route://127.0.0.1:6222", "nats-route://127.0.0.1:6224"]' in lines
    assert "6223" not in lines[lines.index('  listen: "127.0.0.1:6223"') + 1]  # no route to itself


def test_cluster_node_names_must_be_distinct_words() -> None:
    with pytest.raises(ValueError, match="distinct"):
        render_cluster_node(NODES[0], [NODES[0], NODES[1]], "x.conf")
    with pytest.raises(ValueError, match="distinct"):
        render_cluster_node(NODES[0], [NODES[1], ClusterNode("nats-1", "127.0.0.1", 7000)], "x.conf")
    with pytest.raises(ValueError, match="one word"):
        render_cluster_node(ClusterNode("two words", "127.0.0.1", 1), _peers(0), "x.conf")


def test_nats_server_accepts_a_node_config_with_its_users_included(tmp_path: Path) -> None:
    """nats-server itself parses the file (-t: test the configuration, no listener opened)."""
    users = tmp_path / "nats-server.conf"
    users.write_text(nats_config.render_server_config({"gateway": "secret"}))
    node = tmp_path / "nats-0.conf"
    node.write_text(render_cluster_node(NODES[0], _peers(0), users.name))
    done = subprocess.run([str(binaries.nats_server()), "-c", str(node), "-t"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr + done.stdout


def _flag(flags: list[str], name: str) -> str:
    return flags[flags.index(name) + 1]


def test_etcd_member_flags_of_a_three_member_cluster() -> None:
    initial = etcd_initial_cluster([(f"etcd-{i}", "127.0.0.1", 2380 + 2 * i) for i in range(3)])
    assert initial == "etcd-0=http://127.0.0.1:2380,etcd-1=http://127.0.0.1:2382,etcd-2=http://127.0.0.1:2384"
    flags = etcd_member_flags("etcd-1", "127.0.0.1", 2381, 2382, initial, "unimodel")
    assert _flag(flags, "--name") == "etcd-1"
    assert _flag(flags, "--listen-client-urls") == _flag(flags, "--advertise-client-urls") == "http://127.0.0.1:2381"
    assert _flag(flags, "--listen-peer-urls") == _flag(flags, "--initial-advertise-peer-urls") == "http://127.0.0.1:2382"
    assert _flag(flags, "--initial-cluster") == initial
    assert _flag(flags, "--initial-cluster-token") == "unimodel"
    assert _flag(flags, "--initial-cluster-state") == "new"


def test_etcd_single_member_flags_are_unchanged() -> None:
    flags = etcd_member_flags("unimodel", "127.0.0.1", 2379, 2380)
    assert _flag(flags, "--initial-cluster") == "unimodel=http://127.0.0.1:2380"
    assert "--initial-cluster-token" not in flags


def test_etcd_member_names_must_be_distinct() -> None:
    with pytest.raises(ValueError, match="distinct"):
        etcd_initial_cluster([("a", "h", 1), ("a", "h", 2)])


def test_ha_ports_are_fixed_and_distinct() -> None:
    ports = HaPorts()
    assert [ports.nats(i) for i in range(3)] == [(4222, 6222), (4223, 6223), (4224, 6224)]
    assert [ports.etcd(i) for i in range(3)] == [(2379, 2380), (2381, 2382), (2383, 2384)]
    numbers = [p for _, p in ports.all()]
    assert len(numbers) == len(set(numbers)) == 12


def test_up_takes_ha_and_the_cluster_port() -> None:
    cfg = parse_args(["--ha", "--nats-port", "5222", "--nats-cluster-port", "7222", "--etcd-port", "3379"])
    assert cfg.ha and cfg.ha_ports == HaPorts(5222, 7222, 3379)
    assert not parse_args([]).ha
    with pytest.raises(SystemExit):
        parse_args(["--ha", "--nats-cluster-port", "0"])


# a peer that moved to another NATS node (core/path_watch.py) ----------------------------------------------
class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_path_watch_reports_a_reconnect_after_the_oldest_wait_once() -> None:
    answers: dict[str, bool | float | None] = {"b1": True, "b2": 0.4, "b3": 5.0}

    async def probe(instance: str) -> bool | float | None:
        return answers[instance]

    clock = _Clock()
    watch = PathWatch(probe, stall_s=1.0, clock=clock)
    # waiting since 98.0: b2 reconnected at 99.6 (after: what it was sent may be lost), b3 at 95.0 (before)
    assert await watch.check(98.0, ["b1", "b2", "b3"]) == ["b2"]
    assert watch.reconnected == {"b2": pytest.approx(99.6)}  # when, on the watch's clock
    clock.now += 0.5
    answers["b2"] = 0.9  # the same reconnect, seen again: not reported again
    assert await watch.check(98.0, ["b1", "b2", "b3"]) == []
    assert watch.reconnected == {}
    clock.now += 3.0
    answers["b2"] = 0.2  # a new reconnect, after the (new) oldest wait
    assert await watch.check(102.0, ["b1", "b2", "b3"]) == ["b2"]
    answers["b2"] = False  # then it dies: reported as gone, and reported gone once
    assert await watch.check(102.0, ["b1", "b2", "b3"]) == ["b2"]
    assert watch.reconnected == {}
    assert await watch.check(102.0, ["b1", "b2", "b3"]) == []


async def test_path_watch_ignores_reconnects_while_nothing_waits() -> None:
    async def probe(instance: str) -> bool | float | None:
        return 0.1

    watch = PathWatch(probe, stall_s=1.0, clock=_Clock())
    assert await watch.check(None, ["b1"]) == [] and watch.reconnected == {}
    assert await watch.check(99.5, ["b1"]) == []  # not stalled yet


# compose/docker-compose.ha.yml ------------------------------------------------------------------------------
HA_COMPOSE = Path(__file__).resolve().parents[2] / "compose" / "docker-compose.ha.yml"


def test_compose_ha_override_matches_the_compose_spec() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(HA_COMPOSE)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_ha_override_gives_every_service_all_nodes_and_members() -> None:
    base, ha = compose(), yaml.safe_load(HA_COMPOSE.read_text())
    nodes, members = ["nats", "nats-1", "nats-2"], ["etcd", "etcd-1", "etcd-2"]
    assert set(nodes + members) <= set(ha["services"])
    for name in nodes:  # one cluster: every node routes to the same three, under its own server name
        command = ha["services"][name]["command"]
        assert command[command.index("--routes") + 1] == ",".join(f"nats://{n}:6222" for n in nodes)
        assert command[command.index("--cluster_name") + 1] == "unimodel"
        assert "-js" in command and "/run/secrets/nats-server.conf" in command
    names = [ha["services"][n]["command"][ha["services"][n]["command"].index("--server_name") + 1] for n in nodes]
    assert len(set(names)) == 3
    initial = {ha["services"][m]["environment"]["ETCD_INITIAL_CLUSTER"] for m in members}
    assert initial == {",".join(f"{m}=http://{m}:2380" for m in members)}
    for name in members:
        assert f"--name={name}" in ha["services"][name]["command"]
    for name in unimodel_services(base):
        if name == "models":  # the one-shot model builder uses neither
            continue
        env = ha["services"][name]["environment"]
        if name != "etcd-auth":  # the one-shot that turns etcd's authentication on uses no NATS
            assert env["UNIMODEL_NATS_URL"] == ",".join(f"nats://{n}:4222" for n in nodes), name
        assert env["UNIMODEL_ETCD_ENDPOINTS"] == ",".join(f"{m}:2379" for m in members), name



# ReplyMux: "no responders" while every batcher moves to another NATS node (core/replies.py) -------------
async def test_no_responders_is_sent_again_while_the_wait_allows_then_fails() -> None:
    from test_replies import FakeBus, FakeMsg, _sent

    from unimodel.core import errors
    from unimodel.core.context import RequestContext
    from unimodel.core.replies import NO_RESPONDERS_RETRY_S, ReplyMux
    from unimodel.v1 import inference_pb2

    bus = FakeBus()
    mux = ReplyMux(bus, "gw-1")  # type: ignore[arg-type]  # FakeBus stands in for core.bus.Bus
    mux.no_responders_wait_s = 0.6
    call = asyncio.create_task(mux.request_item("b.m", inference_pb2.BatchItem(rows=1), RequestContext.new(5), timeout_s=5))
    (item,) = await _sent(bus, 1)
    await mux._on_message(FakeMsg(item.reply_to, headers={"Status": "503"}))  # type: ignore[arg-type]  # FakeMsg stands in for nats' Msg
    await asyncio.sleep(NO_RESPONDERS_RETRY_S + 0.05)
    subject, payload, reply, _ = bus.nc.published[-1]
    assert len(bus.nc.published) == 2 and subject == "b.m" and reply == item.reply_to  # the same request again
    assert payload == bus.nc.published[0][1] and not call.done()
    await mux._on_message(FakeMsg(reply, b"answer"))  # type: ignore[arg-type]  # a batcher subscribed again: answered
    assert await call == b"answer"

    late = asyncio.create_task(mux.request_item("b.m", inference_pb2.BatchItem(rows=2), RequestContext.new(5), timeout_s=5))
    items = await _sent(bus, 3)
    for _ in range(3):  # no batcher for longer than the wait: 503 in the end
        if late.done():
            break
        await mux._on_message(FakeMsg(items[-1].reply_to, headers={"Status": "503"}))  # type: ignore[arg-type]  # FakeMsg stands in for nats' Msg
        await asyncio.sleep(NO_RESPONDERS_RETRY_S + 0.05)
    with pytest.raises(errors.Unavailable, match="no instance is serving b.m"):
        await late
    assert mux.pending == 0
