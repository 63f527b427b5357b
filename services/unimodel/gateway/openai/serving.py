"""OpenAI-compatible text generation on the gateway:

    POST /v1/chat/completions    chat, blocking or streamed (SSE chunks ending with `data: [DONE]`)
    POST /v1/completions         plain completion, the same way

Bodies follow OpenAI's API (the official `openai` SDK works unchanged; protocol.py); errors use OpenAI's
shape (errors.py) with the HTTP status of the error. A streamed answer starts only once a worker accepted
the request, so refusals (limits, unknown model, queue full) are plain 4xx/5xx answers. A client that
goes away mid-stream aborts the generation in the engine. A generation whose worker dies continues on
another worker, streamed or not (generation_stream.py: mid-stream migration); the client sees one answer.
Chat requests of models with a cache go to the semantic cache first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from unimodel.core import errors
from unimodel.gateway import json_body, rate_limits
from unimodel.gateway.cache_client import BYPASSED, HIT, MISS, Lookup
from unimodel.gateway.generation_stream import Generation
from unimodel.gateway.http_context import http_context, id_headers, starlette_header
from unimodel.gateway.openai.errors import error_event, openai_error
from unimodel.gateway.openai.protocol import (
    AnswerShape,
    ChatCompletionBody,
    CompletionBody,
    chat_request,
    completion_request,
)
from unimodel.gateway.ports import OpenAiPorts
from unimodel.v1 import cache_pb2, generate_pb2


async def _stream(
    gen: Generation, shape: AnswerShape, include_usage: bool, on_done: Callable[[str, str], None] | None = None,
    scope: Mapping[str, Any] | None = None,
) -> Any:
    """The SSE events of a running generation: one per delta of text (built from the answer's template:
    AnswerShape.text_event), the finish chunk, the usage chunk when asked for, `[DONE]`."""
    parts: list[str] | None = [] if on_done is not None else None  # the text, for the cache's write-back
    text_event = shape.text_event
    try:
        if shape.chat:
            yield shape.chunk("", None, role=True)
        async for chunk in gen:
            text = chunk.text
            if text:
                if parts is not None:
                    parts.append(text)
                yield text_event(text)
            if chunk.finish_reason:
                yield shape.chunk(None if shape.chat else "", chunk.finish_reason)
                if include_usage:
                    yield shape.usage_chunk(gen.usage)
                if on_done is not None and parts is not None:
                    on_done("".join(parts), chunk.finish_reason)
                break
    except errors.UnimodelError as err:  # failed after the stream began: an error event, then the end
        yield error_event(err)
    finally:
        await gen.close("the client went away")  # a no-op when it finished; else the worker aborts it
        if scope is not None:
            rate_limits.debit(scope, rate_limits.tokens_used(gen.usage, gen.answer_tokens))
    yield b"data: [DONE]\n\n"


SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


async def generate(gw: OpenAiPorts, request: Request, chat: bool) -> Response:
    try:
        raw = await request.body()
        body: ChatCompletionBody | CompletionBody
        if chat:
            body = json_body.parse_model(raw, ChatCompletionBody)
            req = chat_request(body, request.headers.get("x-session-id", ""))
        else:
            body = json_body.parse_model(raw, CompletionBody)
            req = completion_request(body, request.headers.get("x-session-id", ""))
        header = starlette_header(request.headers)
        ctx = http_context(header, gw.settings.generate_timeout_s)
        lookup: Lookup | None = None
        scope = None
        if isinstance(body, ChatCompletionBody) and _cache_wanted(gw, req.model, body.cache, header("x-unimodel-cache")):
            scope = cache_pb2.CacheScope(model=req.model, tenant=ctx.tenant)
            lookup = await gw.cache.lookup(scope, list(req.messages), ctx)
            gw.stats.cache(req.model, lookup.outcome)
            if lookup.outcome == HIT:
                return _cached(body, lookup, AnswerShape(chat, ctx.request_id, req.model), id_headers(ctx))
        gen = await gw.generate(req, ctx, api="openai", tenant=ctx.tenant)
    except errors.UnimodelError as err:
        return openai_error(err)
    shape = AnswerShape(chat, ctx.request_id, req.model)
    headers = {
        **id_headers(ctx),
        "x-unimodel-worker": gen.first.worker_id,
        "x-unimodel-path": ",".join([gw.id, *gen.first.path]),
    }
    on_done = None
    if lookup is not None:
        headers.update(_cache_headers(lookup))
        if lookup.outcome == MISS and scope is not None:
            messages = list(req.messages)

            def on_done(text: str, finish: str) -> None:
                if finish == "stop" and text.strip():  # only whole answers are worth serving again
                    gw.cache.write_back(scope, messages, text)

    if body.stream:
        include = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(gen, shape, include, on_done, request.scope), media_type="text/event-stream", headers={**SSE_HEADERS, **headers}
        )
    try:
        text = await gen.text()
    except errors.UnimodelError as err:
        return openai_error(err)
    finally:
        await gen.close()
        rate_limits.debit(request.scope, rate_limits.tokens_used(gen.usage, gen.answer_tokens))
    if on_done is not None:
        on_done(text, gen.finish_reason)
    return Response(orjson.dumps(shape.whole(text, gen.finish_reason, gen.usage)), 200, headers=headers, media_type="application/json")


_SWITCH = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}


def _cache_wanted(gw: OpenAiPorts, model: str, in_body: bool | None, in_header: str) -> bool:
    """The request's choice (header, then body), else the model's `cache` setting. Only registered
    text-generation models have a cache scope."""
    config = gw.configs().get(model)
    if in_header:
        choice = _SWITCH.get(in_header.strip().lower())
        if choice is None:
            raise errors.InvalidArgument(
                f"X-UniModel-Cache must be on or off, not {in_header!r}", field="x-unimodel-cache"
            )
        wanted = choice
    elif in_body is not None:
        wanted = in_body
    else:
        wanted = config is not None and config.cache
    if wanted:
        gw.require_ready(model)  # an unknown model is a 404, never a cache hit
    return wanted and config is not None


def _cache_headers(lookup: Lookup) -> dict[str, str]:
    headers = {"x-unimodel-cache": lookup.outcome}
    if lookup.reply is not None and lookup.outcome == HIT:
        headers["x-unimodel-cache-similarity"] = f"{lookup.reply.similarity:.4f}"
        headers["x-unimodel-cache-entry"] = str(lookup.reply.entry_id)
        headers["x-unimodel-cache-match"] = "exact" if lookup.reply.exact else "semantic"
    elif lookup.outcome == BYPASSED:
        headers["x-unimodel-cache-reason"] = " ".join(lookup.reason.split())[:200].encode("ascii", "replace").decode()
    return headers


def _cached(body: ChatCompletionBody, lookup: Lookup, shape: AnswerShape, ids: dict[str, str]) -> Response:
    """A cache hit in the normal response shape: no tokens were computed (usage is zero)."""
    assert lookup.reply is not None
    answer = lookup.reply.answer
    usage = generate_pb2.Usage()
    headers = {**ids, **_cache_headers(lookup)}
    if not body.stream:
        return Response(orjson.dumps(shape.whole(answer, "stop", usage)), 200, headers=headers, media_type="application/json")
    include = bool(body.stream_options and body.stream_options.include_usage)

    async def events() -> Any:
        yield shape.chunk("", None, role=True)
        yield shape.text_event(answer)
        yield shape.chunk(None, "stop")
        if include:
            yield shape.usage_chunk(usage)
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={**SSE_HEADERS, **headers})

