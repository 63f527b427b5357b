"""The hot routes served straight from ASGI, in front of the FastAPI app."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from unimodel.core import errors
from unimodel.gateway.auth import TENANT_HEADER
from unimodel.gateway.big_bodies import Payload
from unimodel.gateway.http_context import read_body, read_body_spooled, send_answer
from unimodel.gateway.kserve.http import infer_asgi, match_infer
from unimodel.gateway.modelcache.serving import handle as modelcache
from unimodel.gateway.openai import embeddings
from unimodel.gateway.ports import KServePorts, ModelCachePorts, OpenAiPorts, UnifiedPorts
from unimodel.gateway.spool import SpooledBody
from unimodel.gateway.unified.errors import Headers, error_result
from unimodel.gateway.unified.http import run_predict

B = TypeVar("B", bytes, bytes | SpooledBody)
class FastPorts(UnifiedPorts, KServePorts, ModelCachePorts, OpenAiPorts, Protocol):
    """What the fast path serves: :predict, KServe infer, ModelCache, OpenAI embeddings."""


class FastRoutes:
    """Serves the hot routes (predict, KServe infer, POST /modelcache, POST /v1/embeddings) straight from
    ASGI, in front of the FastAPI app.

    FastAPI's middleware stack cost about a quarter of the gateway's CPU per echo request (py-spy,
    docs/benchmarks.md); this layer calls the same handler (run_predict) and gives the same error bodies.
    Every other route, and the OpenAPI document, come from the FastAPI app behind it; BodyLimit wraps both.
    """

    PREDICT = re.compile(r"^/v1/models/([^/]+):predict$")

    def __init__(self, app: ASGIApp, gw: FastPorts) -> None:
        self.app, self.gw = app, gw

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        post = scope["type"] == "http" and scope["method"] == "POST"
        match = self.PREDICT.match(scope["path"]) if post else None
        if match is not None:
            name = match.group(1)
            rate = self.gw.settings.big_transfer_bytes_per_s  # a big body and answer are paced (pacing.py)
            await self._json_route(
                scope, receive, send, lambda raw, headers: run_predict(self.gw, name, raw, lambda k: headers.get(k, "")),
                spooling_reader(self.gw.body_codec.spool_from, rate), rate,  # a big body into a file as it arrives (spool.py)
            )
            return
        if post and scope["path"] == "/modelcache":  # cache lookups are the millisecond path too
            await self._json_route(scope, receive, send, self._modelcache, read_all)
            return
        if post and scope["path"] == "/v1/embeddings":  # one text per request is the common client
            await self._json_route(scope, receive, send, lambda raw, headers: self._embeddings(scope, raw, headers), read_all)
            return
        infer = match_infer(scope["path"]) if post else None
        if infer is not None:
            await infer_asgi(self.gw, infer[0], infer[1], scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _modelcache(self, raw: bytes, headers: dict[str, str]) -> tuple[int, bytes, Headers]:
        status, result = await modelcache(
            self.gw, raw, headers.get(TENANT_HEADER, ""), headers.get("x-request-id", ""), headers.get("traceparent", "")
        )
        return status, orjson.dumps(result), []

    async def _embeddings(self, scope: Scope, raw: bytes, headers: dict[str, str]) -> tuple[int, bytes, Headers]:
        status, payload, extra = await embeddings.answer(self.gw, raw, lambda k: headers.get(k, ""), scope)
        return status, payload, [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]

    async def _json_route(
        self, scope: Scope, receive: Receive, send: Send,
        handler: Callable[[B, dict[str, str]], Awaitable[tuple[int, Payload, Headers]]],
        read: Callable[[Receive, dict[str, str]], Awaitable[B]],
        rate: float = 0,
    ) -> None:
        """Read the body (`read`), `handler(body, headers)` -> (status, JSON payload, extra headers), send the
        answer: a big one in slices of SEND_SLICE bytes (uvicorn's flow control applies between them), past
        its first pacing.BURST bytes at most `rate` bytes per second (0: unpaced)."""
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        raw: B | None = None
        status: int
        payload: Payload
        extra: Headers
        try:
            try:
                raw = await read(receive, headers)
            except errors.UnimodelError as err:  # PayloadTooLarge from BodyLimit, or the client left
                status, payload, extra = error_result(err)
            else:
                status, payload, extra = await handler(raw, headers)
        finally:
            if isinstance(raw, SpooledBody):  # the handler unlinks it once read; here on every other path
                raw.close()
        await send_answer(send, status, [(b"content-type", b"application/json"), *extra], payload, rate)


async def read_all(receive: Receive, headers: dict[str, str]) -> bytes:
    return await read_body(receive)


def spooling_reader(spool_from: int, rate: float = 0) -> Callable[[Receive, dict[str, str]], Awaitable[bytes | SpooledBody]]:
    """read_body_spooled with the request's Content-Length (big_bodies.py works on the file) and pace."""

    async def read(receive: Receive, headers: dict[str, str]) -> bytes | SpooledBody:
        length = headers.get("content-length", "")
        return await read_body_spooled(receive, spool_from, int(length) if length.isdigit() else 0, rate)

    return read
