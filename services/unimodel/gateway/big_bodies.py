"""Big request bodies are decoded and encoded in helper processes, off the gateway's event loop.

Turning a JSON body into the BatchItem that goes on the bus (orjson, the JSON -> protobuf Value walk, protobuf
serialization) and the worker's answer back into JSON all hold Python's GIL: orjson and protobuf's C runtime
never let go of it. A 60 MB body costs seconds of that (numbers: ~0.2 s per MB on a loaded 2-core host,
docs/benchmarks.md); in a thread it would stop the event loop just the same. So a body of `offload_body_bytes`
or more goes to a small process pool (`offload_processes`, spawned on first use).

A :predict body crosses by file, not by pickle (spool.py): it is written to a file chunk by chunk as it
arrives, the helper reads it by name and writes the encoded BatchItem (input, parameters, rows; ReplyMux
appends the request's own fields) to a file the gateway maps (no copy); a big answer goes the same way, and
the JSON document comes back as a mapped file the route sends in slices. What stays on the event loop is small
writes and system calls: no step copies more than a few MiB.

Errors in a helper process come back as (code, message, metadata) and are raised as the same UnimodelError
here; a helper that died (killed, out of memory) is replaced, and its request fails with INTERNAL.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from unimodel.core import blobs, errors
from unimodel.core.values import from_value, to_value
from unimodel.gateway import spool
from unimodel.gateway.http_context import http_context, raw_id_headers
from unimodel.gateway.spool import SpooledBody
from unimodel.v1 import inference_pb2

if TYPE_CHECKING:
    from unimodel.core.replies import Encoded
    from unimodel.gateway.ports import AnswerPorts, UnifiedPorts

T = TypeVar("T")
Headers = list[tuple[bytes, bytes]]
Payload = bytes | memoryview
"""An answer's body: bytes, or a view of a mapped file (a big answer, spool.py)."""
PredictParser = Callable[[bytes], Any]
"""unified/http.py parse_body: the :predict body with .input and .parameters, checked (passed in, by reference,
so this module imports no API family)."""


@dataclass(frozen=True, slots=True)
class Failure:
    """An error raised in a helper process, as it crosses back."""

    code: str
    message: str
    metadata: dict[str, str]
    retry_after_s: float = 0.0

    @classmethod
    def of(cls, err: errors.UnimodelError) -> Failure:
        return cls(err.code_name, err.message, err.metadata, err.retry_after_s)

    def error(self) -> errors.UnimodelError:
        err = errors.from_code(self.code, self.message, retry_after_s=self.retry_after_s)
        err.metadata.update(self.metadata)
        return err


# in the helper processes ---------------------------------------------------------------------------------


def encode_predict(parse: PredictParser, raw: bytes) -> bytes | Failure:
    """A :predict body, read by `parse` (the event loop's own checks), as the encoded BatchItem the gateway
    sends (or the Failure it is answered with)."""
    try:
        body = parse(raw)
        item = inference_pb2.BatchItem(input=to_value(body.input), parameters=body.parameters, rows=1)
        return bytes(item.SerializeToString())
    except errors.UnimodelError as err:
        return Failure.of(err)


def decode_predict_reply(raw: spool.Buffer, gateway_id: str) -> tuple[bytes, str, str] | Failure:
    """The worker's encoded PredictResponse as (the JSON answer, worker id, path with `gateway_id` first)."""
    try:
        reply = inference_pb2.PredictResponse.FromString(raw)
        payload = orjson.dumps({"model": reply.model, "output": from_value(reply.output)})
        return payload, reply.worker_id, ",".join([gateway_id, *reply.path])
    except Exception as exc:  # a malformed answer: the client gets INTERNAL, as on the event loop's path
        return Failure("INTERNAL", f"could not decode the answer ({type(exc).__name__})", {})


def encode_predict_file(parse: PredictParser, src: str, dst: str) -> int | Failure:
    """encode_predict of the body in file `src`, written to the new file `dst` (its size)."""
    encoded = encode_predict(parse, spool.read_file(src))
    return encoded if isinstance(encoded, Failure) else spool.write_file(dst, encoded)


def decode_predict_reply_to(raw: spool.Buffer, gateway_id: str, dst: str) -> tuple[str, str] | Failure:
    """decode_predict_reply of `raw`: the JSON answer written to the new file `dst`, and (worker id, path)."""
    decoded = decode_predict_reply(raw, gateway_id)
    if isinstance(decoded, Failure):
        return decoded
    payload, worker, path = decoded
    spool.write_file(dst, payload)
    return worker, path


def answer_from_file(fn: Callable[..., T | Failure], src: str, *args: Any) -> T | Failure:
    """`fn(the answer in file src, *args)`: a big answer read over the bus, spooled by the gateway."""
    return fn(spool.read_file(src), *args)


def answer_from_memory_file(fn: Callable[..., T | Failure], ref: bytes, *args: Any) -> T | Failure:
    """`fn(the answer, *args)`, the answer mapped from its worker's memory file (`ref`: its encoded BlobRef,
    core/blobs.py); UNAVAILABLE when that file is gone."""
    raw = blobs.map_local(inference_pb2.BlobRef.FromString(ref))
    if raw is None:
        return Failure.of(blobs.gone("the answer"))
    return fn(raw, *args)


HELPER_NICENESS = 10
"""How much lower the helper processes' CPU priority is than the gateway's (nice): parsing a 60 MB body is
seconds of CPU that no one waits on but its own client; at the same priority it takes a core from the small
requests of everyone else (docs/benchmarks.md, "Big requests in flight")."""


def _lower_priority() -> None:
    try:
        os.nice(HELPER_NICENESS)
    except OSError:  # not allowed here (some sandboxes): the helpers run at the gateway's priority
        pass


def _ready() -> bool:
    return True


def _guarded(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` with its UnimodelError returned as a Failure (an exception pickled across loses metadata)."""
    try:
        return fn(*args)
    except errors.UnimodelError as err:
        return Failure.of(err)


# in the gateway ----------------------------------------------------------------------------------------------


class BodyCodec:
    """The helper processes of one gateway: `takes(size)` says whether a body goes to them, `run(fn, *args)`
    runs `fn` there. Processes start on first use (spawn: the gateway's threads and gRPC are not forked)."""

    def __init__(self, min_bytes: int, processes: int) -> None:
        self.min_bytes, self.processes = min_bytes, processes
        self._pool: ProcessPoolExecutor | None = None
        self.runs = 0

    def takes(self, size: int) -> bool:
        return self.processes > 0 and 0 < self.min_bytes <= size

    @property
    def spool_from(self) -> int:
        """Bodies of this many bytes or more go to the helpers (0: none), read into a file as they arrive."""
        return self.min_bytes if self.processes > 0 else 0

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            spool.sweep()  # files left by a gateway that was killed mid-request
            self._pool = ProcessPoolExecutor(
                self.processes, mp_context=multiprocessing.get_context("spawn"), initializer=_lower_priority
            )
        return self._pool

    async def run(self, fn: Callable[..., T | Failure], *args: Any) -> T:
        """`fn(*args)` in a helper process (arguments and result pickled: protobuf messages too); its
        UnimodelError (or the Failure it returns) raised here as the same error."""
        return await self._call(fn, args, "")

    async def run_to_file(self, fn: Callable[..., T | Failure], *args: Any, what: str, need: int) -> tuple[Payload, T]:
        """`fn(*args, dst)` in a helper process, which writes its output to the new file `dst` (`what`, about
        `need` bytes): (that file mapped, no copy; fn's result). The file is unlinked on every path: once its
        last view is gone, when fn fails, and when this call is cancelled or its helper dies (then once fn has
        finished)."""
        dst = spool.new_path(what, need)
        result = await self._call(fn, (*args, dst), dst)
        return await spool.map_file(dst), result

    async def _call(self, fn: Callable[..., T | Failure], args: tuple[Any, ...], output: str) -> T:
        self.runs += 1
        try:
            future: Future[T | Failure] = self._executor().submit(_guarded, fn, *args)
            try:
                result = await asyncio.wrap_future(future)
            except BaseException:  # cancelled, or the helper died: fn may still write `output`; when it is done
                if output:
                    future.add_done_callback(lambda _: spool.discard_soon(output))
                raise
        except BrokenProcessPool:  # a helper died: the next request gets a new pool
            if output:  # the pool's other helpers are killed after their futures fail: once more, later
                asyncio.get_running_loop().call_later(2.0, spool.discard_soon, output)
            pool, self._pool = self._pool, None
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
            raise errors.Internal("the gateway's body decoder stopped; try again") from None
        if isinstance(result, Failure):
            if output:
                spool.discard_soon(output)
            raise result.error()
        return result

    async def warm(self) -> float:
        """Start the processes now (seconds taken): the first big body then does not wait for them."""
        started = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(self._executor(), _ready)
        return time.perf_counter() - started

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        spool.settle()  # files being unlinked, then any of this process's left (a helper killed as it wrote)
        spool.sweep(own=True)


async def predict(
    gw: UnifiedPorts, name: str, raw: bytes | SpooledBody, header: Callable[[str], str], parse: PredictParser
) -> tuple[int, Payload, Headers]:
    """POST /v1/models/{name}:predict for a big body (unified/http.py run_predict calls it, and answers its
    errors): read by `parse`, decoded and encoded in the helper processes, and so is a big answer. `raw` comes
    in a file (fast_path.py reads big bodies into one) or, from another route, in memory; the file is
    unlinked here once read."""
    codec = gw.body_codec
    ctx = http_context(header, gw.settings.request_timeout_s)
    body = raw if isinstance(raw, SpooledBody) else await SpooledBody.of(raw, "input")
    try:
        item, _ = await codec.run_to_file(encode_predict_file, parse, body.path, what="item", need=2 * len(body))
    finally:
        body.close()
    answer = await gw.predict_encoded(name, item, ctx)
    del item  # its mapping goes as soon as the bus is done with it
    if isinstance(answer, inference_pb2.BlobRef) or codec.takes(len(answer)):
        payload, (worker, path) = await answer_in_helper(gw, answer, decode_predict_reply_to, gw.id)
    else:
        decoded = decode_predict_reply(answer, gw.id)
        if isinstance(decoded, Failure):
            raise decoded.error()
        payload, worker, path = decoded
    headers: Headers = [*raw_id_headers(ctx), (b"x-unimodel-worker", worker.encode()), (b"x-unimodel-path", path.encode())]
    return 200, payload, headers


async def answer_in_helper(
    gw: AnswerPorts, answer: Encoded | inference_pb2.BlobRef, fn: Callable[..., T | Failure], *args: Any
) -> tuple[Payload, T]:
    """`fn(answer, *args, dst)` in a helper process, which writes what the client gets to `dst`: (that file
    mapped, fn's result). An answer in its worker's memory file (a BlobRef) is mapped by the helper itself, and
    the worker told it was read; one in memory goes to the helper in a file."""
    codec = gw.body_codec
    if isinstance(answer, inference_pb2.BlobRef):  # core/blobs.py
        try:
            return await codec.run_to_file(
                answer_from_memory_file, fn, answer.SerializeToString(), *args, what="json", need=2 * answer.size
            )
        finally:
            await gw.answer_read(answer)
    spooled = await SpooledBody.of(answer, "answer")
    del answer
    try:
        return await codec.run_to_file(answer_from_file, fn, spooled.path, *args, what="json", need=2 * len(spooled))
    finally:
        spooled.close()
