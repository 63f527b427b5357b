"""The OpenAI-compatible routes: chat, completions, embeddings."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from unimodel.core import errors
from unimodel.gateway import json_body, rate_limits
from unimodel.gateway.http_context import http_context, id_headers, starlette_header
from unimodel.gateway.openai import embeddings, serving
from unimodel.gateway.openai.errors import openai_error
from unimodel.gateway.openai.protocol import ChatCompletionBody, CompletionBody
from unimodel.gateway.ports import OpenAiPorts

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the completion (JSON), or with stream=true a text/event-stream of chunks ending with `data: [DONE]`"},
    400: {"description": "invalid request or over a model limit (OpenAI error shape; `code` names the limit)"},
    401: {"description": "missing or wrong API key (when keys are configured)"},
    404: {"description": "unknown model"},
    429: {"description": "the model's queue is full, or the key's rate limit is reached (Retry-After, x-ratelimit-*)"},
    503: {"description": "the model is loading or no worker serves it (Retry-After)"},
    504: {"description": "deadline exceeded"},
}


def register_openai_routes(app: FastAPI, gw: OpenAiPorts) -> None:
    @app.post(
        "/v1/chat/completions", tags=["openai"], summary="Chat completion (OpenAI-compatible; stream=true for SSE)",
        openapi_extra=json_body.openapi_body(ChatCompletionBody), responses=_RESPONSES,
    )
    async def chat_completions(request: Request) -> Response:
        return await serving.generate(gw, request, chat=True)

    @app.post(
        "/v1/completions", tags=["openai"], summary="Text completion (OpenAI-compatible; stream=true for SSE)",
        openapi_extra=json_body.openapi_body(CompletionBody), responses=_RESPONSES,
    )
    async def completions(request: Request) -> Response:
        return await serving.generate(gw, request, chat=False)

    @app.post(
        "/v1/embeddings", tags=["openai"], summary="Text embeddings (OpenAI-compatible)",
        openapi_extra=json_body.openapi_body(embeddings.EmbeddingBody),
        responses={
            200: {"description": "the embeddings, in input order"},
            400: {"description": "invalid input, or not a text-embedding model (OpenAI error shape)"},
            404: {"description": "unknown model"},
            503: {"description": "the model is loading or no worker serves it (Retry-After)"},
        },
    )
    async def create_embeddings(request: Request) -> Response:
        try:
            body = json_body.parse_model(await request.body(), embeddings.EmbeddingBody)
            ctx = http_context(starlette_header(request.headers), gw.settings.request_timeout_s)
            vectors, tokens = await embeddings.embed(gw, body, ctx)
        except errors.UnimodelError as err:
            return openai_error(err)
        rate_limits.debit(request.scope, tokens)  # the key's tokens-per-minute limit
        payload = embeddings.response_body(body.model, vectors, tokens, body.encoding_format)
        return Response(payload, 200, headers=id_headers(ctx), media_type="application/json")
