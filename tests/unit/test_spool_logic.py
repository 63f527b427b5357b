"""Big bodies through files (gateway/spool.py, issue 16): a :predict body read into a file chunk by chunk, the
helper process reading and writing files by name, the answer mapped and sent in slices, the transport that no
longer joins big writes; and every file unlinked on every path (errors, disconnects, cancellation, a helper
that dies). Real helper processes; no network."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import subprocess
import sys
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import orjson
import pytest

from unimodel.core import errors
from unimodel.gateway import big_bodies, spool
from unimodel.gateway.fast_path import FastRoutes, read_all, spooling_reader
from unimodel.gateway.http_context import SEND_SLICE, read_body_spooled
from unimodel.gateway.http_protocol import JOIN_LIMIT, CoalescingTransport
from unimodel.gateway.spool import SpooledBody
from unimodel.gateway.unified.http import parse_body
from unimodel.v1 import inference_pb2

MIB = 1024 * 1024


def ours() -> list[str]:
    """This process's files, wherever they went."""
    mine = f"{spool.PREFIX}{os.getpid()}-"
    found = []
    for directory in (spool.SHM, spool.tempfile.gettempdir()):
        found += [name for name in os.listdir(directory) if name.startswith(mine)]
    return found


def settled() -> list[str]:
    """ours() once the spool's threads have unlinked what they were given: a mapping that a cancelled call's
    thread finishes after the first look is collected and unlinked on a later one (the spool's threads run at a
    lower priority: on a busy host they finish later); what is still there after a second is left over."""
    for _ in range(50):
        gc.collect()
        spool.settle()
        if not ours():
            return []
        time.sleep(0.02)
    return ours()


def present() -> list[str]:
    """ours() after one collection and settling: for files that should still be there."""
    gc.collect()
    spool.settle()
    return ours()


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    assert settled() == []
    yield
    assert settled() == [], "a file was left behind"


def receiver(chunks: list[bytes], *, disconnect: bool = False) -> Any:
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1 or disconnect} for i, c in enumerate(chunks)
    ]
    if disconnect:
        messages.append({"type": "http.disconnect"})
    it = iter(messages)

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(0)
        return next(it)

    return receive


# files -----------------------------------------------------------------------------------------------------


def test_a_spooled_body_holds_what_was_written_and_close_unlinks_it() -> None:
    body = SpooledBody("input", 10)
    body.write(b"hello ")
    body.write(memoryview(b"world"))
    body.finish()
    assert len(body) == 11 and Path(body.path).read_bytes() == b"hello world"
    assert os.path.basename(body.path).startswith(f"unimodel-{os.getpid()}-") and body.path.endswith("-input")
    with pytest.raises(ValueError, match="finished"):
        body.write(b"more")
    body.close()
    body.close()  # idempotent
    assert settled() == []


async def test_a_body_in_memory_is_written_to_a_file_off_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool, "WRITE_SLICE", 1000)
    data = bytes(range(256)) * 40  # 10 240 bytes: 11 writes
    body = await SpooledBody.of(data, "answer")
    try:
        assert Path(body.path).read_bytes() == data and len(body) == len(data)
    finally:
        body.close()


async def test_a_mapped_file_stays_until_its_last_view_goes() -> None:
    path = spool.new_path("json", 100)
    assert spool.write_file(path, b'{"output": 1}') == 13
    view = await spool.map_file(path)
    assert bytes(view) == b'{"output": 1}' and isinstance(view, memoryview) and view.readonly
    part = view[2:8]
    del view
    assert present() != []  # a slice still holds the mapping
    assert bytes(part) == b'output'
    del part
    await asyncio.sleep(0)  # the loop's wake-up handle of this step holds the map's result until the step ends
    assert settled() == []
    empty = spool.new_path("json", 0)
    spool.write_file(empty, b"")
    assert await spool.map_file(empty) == b""


@pytest.mark.parametrize("wait", [0.0, 0.001, 0.05], ids=["before it maps", "while it maps", "once mapped"])
async def test_a_cancelled_map_leaves_no_file(wait: float) -> None:
    path = spool.new_path("item", 3 * MIB)
    spool.write_file(path, b"m" * 3 * MIB)
    task = asyncio.create_task(spool.map_file(path))
    await asyncio.sleep(wait)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):  # once mapped, the view is dropped unused
        await task
    del task
    await asyncio.sleep(0)
    assert settled() == []


def test_write_file_refuses_an_existing_name_and_a_full_disk_is_resource_exhausted() -> None:
    path = spool.new_path("item", 10)
    spool.write_file(path, b"x")
    try:
        with pytest.raises(errors.ResourceExhausted, match="no room"):
            spool.write_file(path, b"y")  # O_EXCL: never someone else's file
        assert Path(path).read_bytes() == b"x"
    finally:
        spool.discard(path)
    if os.path.exists("/dev/full"):  # writes there fail with ENOSPC, as on a full /dev/shm
        body = SpooledBody("input", 1)
        os.close(body._fd)  # type: ignore[arg-type]  # the test swaps the file for /dev/full
        body._fd = os.open("/dev/full", os.O_WRONLY)
        with pytest.raises(errors.ResourceExhausted, match="no room"):
            body.write(b"abc")
        assert settled() == []  # closed and unlinked on the way out


def test_spool_dir_prefers_dev_shm_when_it_has_room() -> None:
    assert spool.spool_dir(1) == spool.SHM
    assert spool.spool_dir(1 << 60) == spool.tempfile.gettempdir()  # no room: the temporary directory


def test_sweep_removes_the_files_of_gateways_that_are_gone_and_its_own_only_when_asked(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    names = [f"unimodel-{dead}-ab-input", f"unimodel-{os.getpid()}-cd-json", f"unimodel-{os.getppid()}-ef-item", "other"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert spool.sweep((str(tmp_path),)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])
    assert spool.sweep((str(tmp_path),), own=True) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])  # a live gateway's files stay


# reading a body ----------------------------------------------------------------------------------------------


async def test_a_small_body_stays_in_memory() -> None:
    got = await read_body_spooled(receiver([b"ab", b"cd"]), 100, 4)
    assert got == b"abcd"
    assert await read_body_spooled(receiver([b"x" * 500]), 0, 500) == b"x" * 500  # 0: never spooled


@pytest.mark.parametrize("expected", [3000, 0], ids=["content-length", "no content-length"])
async def test_a_big_body_goes_into_a_file_chunk_by_chunk(expected: int) -> None:
    chunks = [bytes([i]) * 300 for i in range(10)]
    got = await read_body_spooled(receiver(chunks), 1000, expected)
    assert isinstance(got, SpooledBody)
    try:
        assert len(got) == 3000 and Path(got.path).read_bytes() == b"".join(chunks)
    finally:
        got.close()


async def test_a_client_that_leaves_mid_body_leaves_no_file() -> None:
    with pytest.raises(errors.Cancelled):
        await read_body_spooled(receiver([b"x" * 600, b"y" * 600], disconnect=True), 1000, 5000)
    with pytest.raises(errors.Cancelled):
        await read_body_spooled(receiver([b"x" * 600, b"y" * 600], disconnect=True), 1000, 0)


async def test_a_read_cancelled_mid_body_leaves_no_file() -> None:
    first = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if not first.is_set():
            first.set()
            return {"type": "http.request", "body": b"x" * 2000, "more_body": True}
        await asyncio.sleep(60)
        raise AssertionError("not cancelled")

    task = asyncio.create_task(read_body_spooled(receive, 1000, 10_000))
    await first.wait()
    await asyncio.sleep(0.01)
    assert len(present()) == 1  # the body is in its file by now
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_body_over_the_limit_while_it_streams_leaves_no_file() -> None:
    sent = 0

    async def limited() -> dict[str, Any]:  # BodyLimit's receive raises once the body passes the limit
        nonlocal sent
        sent += 1
        if sent > 3:
            raise errors.PayloadTooLarge("request body exceeds the limit")
        return {"type": "http.request", "body": b"z" * 1000, "more_body": True}

    with pytest.raises(errors.PayloadTooLarge):
        await read_body_spooled(limited, 1000, 0)


# sending the answer ------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.messages: list[MutableMapping[str, Any]] = []

    async def __call__(self, message: MutableMapping[str, Any]) -> None:
        self.messages.append(message)


async def json_route(payload: Any, raw_seen: list[Any], chunks: list[bytes], spool_from: int) -> Recorder:
    routes = FastRoutes(None, None)  # type: ignore[arg-type]  # _json_route needs neither the app nor the gateway
    send = Recorder()

    async def handler(raw: Any, headers: dict[str, str]) -> tuple[int, Any, list[tuple[bytes, bytes]]]:
        raw_seen.append(raw)
        if isinstance(payload, Exception):
            raise payload
        return 200, payload, [(b"x-test", b"1")]

    scope = {"type": "http", "headers": [(b"content-length", str(sum(map(len, chunks))).encode())]}
    await routes._json_route(scope, receiver(chunks), send, handler, spooling_reader(spool_from))
    return send


async def test_a_big_answer_is_sent_in_slices_of_a_view_of_it() -> None:
    path = spool.new_path("json", 0)
    data = orjson.dumps({"output": "a" * (2 * SEND_SLICE + 123)})
    spool.write_file(path, data)
    send = await json_route(await spool.map_file(path), [], [b"{}"], 0)
    start, *bodies = send.messages
    assert start["status"] == 200 and (b"content-length", str(len(data)).encode()) in start["headers"]
    assert [len(m["body"]) for m in bodies] == [SEND_SLICE, SEND_SLICE, len(data) - 2 * SEND_SLICE]
    assert [m["more_body"] for m in bodies] == [True, True, False]
    assert all(isinstance(m["body"], memoryview) for m in bodies)  # slices of the mapping, not copies
    assert b"".join(m["body"] for m in bodies) == data


async def test_a_small_answer_is_one_message() -> None:
    send = await json_route(b'{"ok":1}', [], [b"{}"], 0)
    assert [m["type"] for m in send.messages] == ["http.response.start", "http.response.body"]
    assert send.messages[1]["body"] == b'{"ok":1}' and not send.messages[1].get("more_body")


async def test_the_route_closes_the_spooled_body_even_when_the_handler_fails() -> None:
    seen: list[Any] = []
    with pytest.raises(RuntimeError):
        await json_route(RuntimeError("boom"), seen, [b"x" * 3000], 1000)
    assert isinstance(seen[0], SpooledBody) and settled() == []
    plain: list[Any] = []
    await json_route(b"{}", plain, [b"y" * 10], 0)  # read_all is the other routes' reader
    assert plain == [b"y" * 10] and read_all is not None


# the transport -----------------------------------------------------------------------------------------------


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[Any] = []

    def write(self, data: Any) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


async def test_big_pending_writes_go_out_one_by_one_never_joined() -> None:
    raw = RecordingTransport()
    t = CoalescingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]  # RecordingTransport records writes in place of an asyncio.Transport
    head, big = b"HTTP/1.1 200 OK\r\n\r\n", memoryview(b"b" * (JOIN_LIMIT + 1))
    t.write(head)
    t.write(big)
    assert t.get_write_buffer_size() == len(head) + len(big)
    await asyncio.sleep(0)
    assert raw.writes[0] is head and raw.writes[1] is big  # the same objects: nothing copied
    assert t.get_write_buffer_size() == 0
    t.write(b"a" * 10)
    t.write(b"b" * 10)
    await asyncio.sleep(0)
    assert raw.writes[2:] == [b"a" * 10 + b"b" * 10]  # small ones are still joined: one system call


# the helper processes ----------------------------------------------------------------------------------------


def slow_write(seconds: float, dst: str) -> int:
    time.sleep(seconds)
    return spool.write_file(dst, b"late")


def die(dst: str) -> int:
    os._exit(1)


def fail_after_writing(dst: str) -> int:
    spool.write_file(dst, b"half")
    raise errors.InvalidArgument("bad body", field="input")


@pytest.fixture
def codec() -> Iterator[big_bodies.BodyCodec]:
    codec = big_bodies.BodyCodec(1, 1)
    yield codec
    codec.close()


async def test_the_helper_reads_the_body_by_name_and_its_item_comes_back_mapped(codec: big_bodies.BodyCodec) -> None:
    body = await SpooledBody.of(orjson.dumps({"input": "a" * 300_000, "parameters": {"k": "v"}}), "input")
    try:
        item, size = await codec.run_to_file(big_bodies.encode_predict_file, parse_body, body.path, what="item", need=len(body))
    finally:
        body.close()
    assert isinstance(item, memoryview) and size == len(item)
    decoded = inference_pb2.BatchItem.FromString(item)
    assert decoded.input.string_value == "a" * 300_000 and dict(decoded.parameters) == {"k": "v"} and decoded.rows == 1


async def test_the_answer_is_decoded_to_a_mapped_json_file(codec: big_bodies.BodyCodec) -> None:
    reply = inference_pb2.PredictResponse(model="echo", worker_id="w1", path=["b1", "w1"])
    reply.output.string_value = "z" * 200_000
    answer = await SpooledBody.of(reply.SerializeToString(), "answer")
    try:
        payload, (worker, path) = await codec.run_to_file(
            big_bodies.answer_from_file, big_bodies.decode_predict_reply_to, answer.path, "g1", what="json", need=len(answer)
        )
    finally:
        answer.close()
    assert orjson.loads(payload) == {"model": "echo", "output": "z" * 200_000}
    assert (worker, path) == ("w1", "g1,b1,w1")


async def test_a_helper_error_is_raised_here_and_its_file_is_gone(codec: big_bodies.BodyCodec) -> None:
    body = await SpooledBody.of(b"[1, 2]", "input")
    try:
        with pytest.raises(errors.InvalidArgument, match="JSON object"):
            await codec.run_to_file(big_bodies.encode_predict_file, parse_body, body.path, what="item", need=10)
        with pytest.raises(errors.InvalidArgument, match="bad body") as caught:
            await codec.run_to_file(fail_after_writing, what="item", need=10)  # wrote its file, then failed
        assert caught.value.metadata == {"field": "input"}
    finally:
        body.close()


async def test_a_helper_that_dies_is_internal_and_the_next_call_gets_a_new_pool(codec: big_bodies.BodyCodec) -> None:
    with pytest.raises(errors.Internal, match="stopped"):
        await codec.run_to_file(die, what="item", need=10)
    view, size = await codec.run_to_file(slow_write, 0.0, what="item", need=10)
    assert bytes(view) == b"late" and size == 4


async def test_a_cancelled_call_unlinks_the_file_its_helper_writes_later(codec: big_bodies.BodyCodec) -> None:
    await codec.warm()
    task = asyncio.create_task(codec.run_to_file(slow_write, 3.0, what="item", need=10))  # 3 s: room on a loaded host
    await asyncio.sleep(0.2)  # the helper is sleeping now
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert settled() == []  # not written yet
    await codec.run(big_bodies._ready)  # one helper: this runs once the cancelled call has written its file
    assert settled() == []  # and unlinked it when it was done
