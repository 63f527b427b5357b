"""OpenAI-compatible text generation on the gateway (protocol translation only):

    POST /v1/chat/completions    chat, blocking or streamed (SSE chunks ending with `data: [DONE]`)
    POST /v1/completions         plain completion, the same way

Bodies follow OpenAI's API (the official `openai` SDK works unchanged); errors use OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with the HTTP status of the error. A streamed answer
starts only once a worker accepted the request, so refusals (limits, unknown model, queue full) are
plain 4xx/5xx answers. A client that goes away mid-stream aborts the generation in the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidatorFunctionWrapHandler, field_validator
from pydantic_core import PydanticCustomError

from unimodel.core import errors
from unimodel.core.context import RequestContext
from unimodel.gateway import json_body
from unimodel.gateway.auth import TENANT_HEADER
from unimodel.gateway.cache_client import BYPASSED, HIT, MISS, Lookup
from unimodel.gateway.generation import Generation
from unimodel.v1 import cache_pb2, generate_pb2

if TYPE_CHECKING:
    from unimodel.gateway.service import GatewayService

_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
    409: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
}
_CODES = {"NOT_FOUND": "model_not_found", "UNAUTHENTICATED": "invalid_api_key"}


def openai_error(err: errors.UnimodelError) -> Response:
    status = err.http_status
    meta = err.metadata
    body = {
        "error": {
            "message": err.message,
            "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": meta.get("field") or None,
            "code": meta.get("limit") or _CODES.get(err.code_name) or err.code_name.lower(),
        }
    }
    headers = {}
    retry = err.retry_after_s
    if retry:
        headers["retry-after"] = str(max(1, round(retry)))
    return Response(orjson.dumps(body), status, headers=headers, media_type="application/json")


# request bodies (OpenAPI documents them; extra fields are ignored, as OpenAI's server does) ---------------
class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    role: str = Field(..., description="system, developer, user or assistant")
    content: str | list[TextPart] | None = Field(..., description="text, or a list of text parts")
    name: str | None = None

    @field_validator("content", mode="wrap")
    @classmethod
    def _content(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:  # one message instead of one per member of the union
            raise PydanticCustomError("content", "must be a string or a list of text parts") from None


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float | None = Field(None, description="0 to 2; 0 = greedy")
    top_p: float | None = Field(None, description="greater than 0, at most 1")
    max_tokens: int | None = Field(None, description="tokens to generate at most (default: the model's)")
    stop: str | list[str] | None = Field(None, description="up to 4 stop sequences")
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = Field(None, description="extension: sample among the k most likely tokens")
    min_tokens: int | None = Field(None, description="extension (vLLM's): no end of sequence before this many tokens")
    ignore_eos: bool = Field(False, description="extension (vLLM's): generate until max_tokens or a stop string")
    n: int | None = Field(None, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="end-user id: also the affinity key (one conversation, one worker)")


class ChatCompletionBody(_Sampling):
    messages: list[ChatMessageIn] = Field(..., description="the conversation")
    max_completion_tokens: int | None = Field(None, description="alias of max_tokens")
    cache: bool | None = Field(
        None, description="extension: use the semantic cache for this request (default: the model's `cache` setting)"
    )


class CompletionBody(_Sampling):
    prompt: str | list[str] = Field(..., description="the prompt (a list of one string is accepted)")
    echo: bool = False


def _sampling(body: _Sampling, max_tokens: int | None) -> generate_pb2.SamplingParams:
    if body.n not in (None, 1):
        raise errors.InvalidArgument(f"n {body.n} is not supported (only 1)", field="n")
    s = generate_pb2.SamplingParams()
    if body.temperature is not None:
        s.temperature = body.temperature
    if body.top_p is not None:
        s.top_p = body.top_p
    if max_tokens is not None:
        if max_tokens < 1:
            raise errors.InvalidArgument(f"max_tokens {max_tokens} must be at least 1", field="max_tokens")
        s.max_tokens = min(max_tokens, 1 << 30)
    if body.stop is not None:
        s.stop.extend([body.stop] if isinstance(body.stop, str) else body.stop)
    if body.seed is not None:
        s.seed = body.seed
    s.presence_penalty = body.presence_penalty or 0.0
    s.frequency_penalty = body.frequency_penalty or 0.0
    if body.top_k is not None:
        s.top_k = body.top_k
    if body.min_tokens is not None:
        s.min_tokens = max(-1, min(body.min_tokens, 1 << 30))  # validate() names a negative one
    s.ignore_eos = body.ignore_eos
    return s


def chat_request(body: ChatCompletionBody, session: str) -> generate_pb2.GenerateRequest:
    request = generate_pb2.GenerateRequest(model=body.model, session=session or body.user or "")
    if not body.messages:
        raise errors.InvalidArgument("messages must not be empty", field="messages")
    for i, m in enumerate(body.messages):
        content = m.content
        if content is None:
            if m.role != "assistant":
                raise errors.InvalidArgument(f"messages[{i}].content is required", field=f"messages[{i}].content")
            content = ""
        elif isinstance(content, list):
            content = "".join(part.text for part in content)
        request.messages.add(role=m.role, content=content, name=m.name or "")
    max_tokens = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
    request.sampling.CopyFrom(_sampling(body, max_tokens))
    return request


def completion_request(body: CompletionBody, session: str) -> generate_pb2.GenerateRequest:
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise errors.InvalidArgument("prompt: a list must hold exactly one string (batched prompts are not supported)", field="prompt")
        prompt = prompt[0]
    if not prompt:
        raise errors.InvalidArgument("prompt must not be empty", field="prompt")
    if body.echo:
        raise errors.InvalidArgument("echo is not supported", field="echo")
    request = generate_pb2.GenerateRequest(model=body.model, prompt=prompt, session=session or body.user or "")
    request.sampling.CopyFrom(_sampling(body, body.max_tokens))
    return request


# answers -------------------------------------------------------------------------------------------
def _usage(usage: generate_pb2.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


class _Shape:
    """What differs between chat and completions answers."""

    def __init__(self, chat: bool, rid: str, model: str) -> None:
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + rid
        self.model = model
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def whole(self, text: str, finish: str, usage: generate_pb2.Usage) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish or "stop", "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {
            "id": self.id, "object": self.object, "created": self.created, "model": self.model,
            "choices": [choice], "usage": _usage(usage), "system_fingerprint": None,
        }

    def chunk(self, text: str | None, finish: str | None, *, role: bool = False, usage: Any = None) -> bytes:
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        doc = {
            "id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
            "choices": [choice], "system_fingerprint": None,
        }
        if usage is not None:
            doc["usage"] = usage
        return b"data: " + orjson.dumps(doc) + b"\n\n"

    def usage_chunk(self, usage: generate_pb2.Usage) -> bytes:
        doc = {
            "id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
            "choices": [], "usage": _usage(usage), "system_fingerprint": None,
        }
        return b"data: " + orjson.dumps(doc) + b"\n\n"


def _error_event(err: errors.UnimodelError) -> bytes:
    body = orjson.loads(openai_error(err).body)
    return b"data: " + orjson.dumps(body) + b"\n\n"


async def _stream(
    gen: Generation, shape: _Shape, include_usage: bool, on_done: Callable[[str, str], None] | None = None
) -> Any:
    extra: dict[str, Any] = {"usage": None} if include_usage else {}
    parts: list[str] = []
    try:
        if shape.chat:
            yield shape.chunk("", None, role=True, **extra)
        async for chunk in gen:
            if chunk.text:
                parts.append(chunk.text)
            if chunk.finish_reason:
                if chunk.text:
                    yield shape.chunk(chunk.text, None, **extra)
                yield shape.chunk(None if shape.chat else "", chunk.finish_reason, **extra)
                if include_usage:
                    yield shape.usage_chunk(gen.usage)
                if on_done is not None:
                    on_done("".join(parts), chunk.finish_reason)
                break
            if chunk.text:
                yield shape.chunk(chunk.text, None, **extra)
    except errors.UnimodelError as err:  # failed after the stream began: an error event, then the end
        yield _error_event(err)
    finally:
        await gen.close("the client went away")  # a no-op when it finished; else the worker aborts it
    yield b"data: [DONE]\n\n"


SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


async def _generate(gw: GatewayService, request: Request, chat: bool) -> Response:
    try:
        raw = await request.body()
        if chat:
            body = json_body.parse_model(raw, ChatCompletionBody)
            req = chat_request(body, request.headers.get("x-session-id", ""))
        else:
            body = json_body.parse_model(raw, CompletionBody)
            req = completion_request(body, request.headers.get("x-session-id", ""))
        header = request.headers.get
        ctx = RequestContext.new(
            gw.settings.generate_timeout_s, request_id=header("x-request-id", ""),
            traceparent=header("traceparent", ""), tracestate=header("tracestate", ""),
            tenant=header(TENANT_HEADER, ""),
        )
        lookup: Lookup | None = None
        scope = None
        if chat and _cache_wanted(gw, req.model, body.cache, header("x-unimodel-cache", "")):
            scope = cache_pb2.CacheScope(model=req.model, tenant=ctx.tenant)
            lookup = await gw.cache.lookup(scope, list(req.messages), ctx)
            gw.stats.cache(req.model, lookup.outcome)
            if lookup.outcome == HIT:
                return _cached(body, lookup, _Shape(chat, ctx.request_id, req.model), ctx.request_id)
        gen = await gw.generate(req, ctx, api="openai", tenant=ctx.tenant)
    except errors.UnimodelError as err:
        return openai_error(err)
    shape = _Shape(chat, ctx.request_id, req.model)
    headers = {
        "x-request-id": ctx.request_id,
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
            _stream(gen, shape, include, on_done), media_type="text/event-stream", headers={**SSE_HEADERS, **headers}
        )
    try:
        text = await gen.text()
    except errors.UnimodelError as err:
        return openai_error(err)
    finally:
        await gen.close()
    if on_done is not None:
        on_done(text, gen.finish_reason)
    return Response(orjson.dumps(shape.whole(text, gen.finish_reason, gen.usage)), 200, headers=headers, media_type="application/json")


_SWITCH = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}


def _cache_wanted(gw: GatewayService, model: str, in_body: bool | None, in_header: str) -> bool:
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


def _cached(body: ChatCompletionBody, lookup: Lookup, shape: _Shape, request_id: str) -> Response:
    """A cache hit in the normal response shape: no tokens were computed (usage is zero)."""
    assert lookup.reply is not None
    answer = lookup.reply.answer
    usage = generate_pb2.Usage()
    headers = {"x-request-id": request_id, **_cache_headers(lookup)}
    if not body.stream:
        return Response(orjson.dumps(shape.whole(answer, "stop", usage)), 200, headers=headers, media_type="application/json")
    include = bool(body.stream_options and body.stream_options.include_usage)
    extra: dict[str, Any] = {"usage": None} if include else {}

    async def events() -> Any:
        yield shape.chunk("", None, role=True, **extra)
        yield shape.chunk(answer, None, **extra)
        yield shape.chunk(None, "stop", **extra)
        if include:
            yield shape.usage_chunk(usage)
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={**SSE_HEADERS, **headers})


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the completion (JSON), or with stream=true a text/event-stream of chunks ending with `data: [DONE]`"},
    400: {"description": "invalid request or over a model limit (OpenAI error shape; `code` names the limit)"},
    401: {"description": "missing or wrong API key (when keys are configured)"},
    404: {"description": "unknown model"},
    429: {"description": "the model's queue is full (Retry-After)"},
    503: {"description": "the model is loading or no worker serves it (Retry-After)"},
    504: {"description": "deadline exceeded"},
}


def register_openai_routes(app: FastAPI, gw: GatewayService) -> None:
    @app.post(
        "/v1/chat/completions", tags=["openai"], summary="Chat completion (OpenAI-compatible; stream=true for SSE)",
        openapi_extra=json_body.openapi_body(ChatCompletionBody), responses=_RESPONSES,
    )
    async def chat_completions(request: Request) -> Response:
        return await _generate(gw, request, chat=True)

    @app.post(
        "/v1/completions", tags=["openai"], summary="Text completion (OpenAI-compatible; stream=true for SSE)",
        openapi_extra=json_body.openapi_body(CompletionBody), responses=_RESPONSES,
    )
    async def completions(request: Request) -> Response:
        return await _generate(gw, request, chat=False)
