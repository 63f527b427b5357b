"""Big request bodies are decoded and encoded in helper processes, off the gateway's event loop.

Turning a JSON body into the BatchItem that goes on the bus (orjson, the JSON -> protobuf Value walk, protobuf
serialization) and the worker's answer back into JSON all hold Python's GIL: orjson and protobuf's C runtime
never let go of it. A 60 MB body costs seconds of that (numbers: ~0.2 s per MB on a loaded 2-core host,
docs/benchmarks.md); in a thread it would stop the event loop just the same. So a body of `offload_body_bytes`
or more is handed as bytes to a small process pool (`offload_processes`, spawned on first use) that returns
bytes: the encoded BatchItem (input, parameters, rows; ReplyMux appends the request's own fields), and for the
answer the JSON document and the two headers the route sends. What stays on the event loop is copying bytes.

Errors in a helper process come back as (code, message, metadata) and are raised as the same UnimodelError
here; a helper that died (killed, out of memory) is replaced, and its request fails with INTERNAL.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from unimodel.core import errors
from unimodel.core.values import from_value, to_value
from unimodel.gateway.http_context import http_context, raw_id_headers
from unimodel.v1 import inference_pb2

if TYPE_CHECKING:
    from unimodel.gateway.ports import UnifiedPorts

T = TypeVar("T")
Headers = list[tuple[bytes, bytes]]
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


def decode_predict_reply(raw: bytes, gateway_id: str) -> tuple[bytes, str, str] | Failure:
    """The worker's encoded PredictResponse as (the JSON answer, worker id, path with `gateway_id` first)."""
    try:
        reply = inference_pb2.PredictResponse.FromString(raw)
        payload = orjson.dumps({"model": reply.model, "output": from_value(reply.output)})
        return payload, reply.worker_id, ",".join([gateway_id, *reply.path])
    except Exception as exc:  # a malformed answer: the client gets INTERNAL, as on the event loop's path
        return Failure("INTERNAL", f"could not decode the answer ({type(exc).__name__})", {})


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

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    async def run(self, fn: Callable[..., T | Failure], *args: Any) -> T:
        """`fn(*args)` in a helper process (arguments and result pickled: protobuf messages too); its
        UnimodelError (or the Failure it returns) raised here as the same error."""
        loop = asyncio.get_running_loop()
        self.runs += 1
        try:
            result = await loop.run_in_executor(self._executor(), _guarded, fn, *args)
        except BrokenProcessPool:  # a helper died: the next request gets a new pool
            pool, self._pool = self._pool, None
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
            raise errors.Internal("the gateway's body decoder stopped; try again") from None
        if isinstance(result, Failure):
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


async def predict(
    gw: UnifiedPorts, name: str, raw: bytes, header: Callable[[str], str], parse: PredictParser
) -> tuple[int, bytes, Headers]:
    """POST /v1/models/{name}:predict for a big body (unified/http.py run_predict calls it, and answers its
    errors): read by `parse`, decoded and encoded in the helper processes, and so is a big answer."""
    codec = gw.body_codec
    ctx = http_context(header, gw.settings.request_timeout_s)
    item = await codec.run(encode_predict, parse, raw)
    answer = await gw.predict_encoded(name, item, ctx)
    if codec.takes(len(answer)):
        payload, worker, path = await codec.run(decode_predict_reply, answer, gw.id)
    else:
        decoded = decode_predict_reply(answer, gw.id)
        if isinstance(decoded, Failure):
            raise decoded.error()
        payload, worker, path = decoded
    headers: Headers = [*raw_id_headers(ctx), (b"x-unimodel-worker", worker.encode()), (b"x-unimodel-path", path.encode())]
    return 200, payload, headers
