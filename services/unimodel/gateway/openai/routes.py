"""The OpenAI-compatible routes: chat, completions, embeddings, audio transcriptions and translations."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from unimodel.gateway import json_body
from unimodel.gateway.http_context import starlette_header
from unimodel.gateway.openai import audio, embeddings, serving
from unimodel.gateway.openai.protocol import ChatCompletionBody, CompletionBody
from unimodel.gateway.ports import OpenAiPorts

_AUDIO_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the transcript in the response_format asked for (json, text, verbose_json, srt, vtt)"},
    400: {"description": "a missing or bad field, an empty or damaged file, or not a speech-to-text model (OpenAI error shape)"},
    401: {"description": "missing or wrong API key (when keys are configured)"},
    404: {"description": "unknown model"},
    413: {"description": "longer than the model's max_audio_seconds, or a body over the gateway's limit"},
    415: {"description": "an audio format the server does not decode (it reads WAV, FLAC, MP3, OGG)"},
    429: {"description": "the model's queue is full, or the key's rate limit is reached (Retry-After)"},
    503: {"description": "the model is loading or no worker serves it (Retry-After)"},
    504: {"description": "deadline exceeded"},
}
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
        # served by the gateway's fast path (fast_path.py); this route documents it and answers the same way
        status, payload, headers = await embeddings.answer(gw, await request.body(), starlette_header(request.headers), request.scope)
        return Response(payload, status, headers=headers, media_type="application/json")

    @app.post(
        "/v1/audio/transcriptions", tags=["openai"], summary="Speech to text (OpenAI-compatible; multipart upload)",
        openapi_extra=audio.openapi_form("transcriptions"), responses=_AUDIO_RESPONSES,
    )
    async def transcriptions(request: Request) -> Response:
        return await audio.answer(gw, request, "transcriptions")

    @app.post(
        "/v1/audio/translations", tags=["openai"], summary="Speech to English text (OpenAI-compatible; multipart upload)",
        openapi_extra=audio.openapi_form("translations"), responses=_AUDIO_RESPONSES,
    )
    async def translations(request: Request) -> Response:
        return await audio.answer(gw, request, "translations")
