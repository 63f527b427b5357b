"""OpenAI's embeddings API on the gateway (protocol translation only): `POST /v1/embeddings`.

    {"model": "all-minilm-l6-v2", "input": "text" | ["text", ...], "encoding_format": "float" | "base64"}
 -> {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": [...] | "<base64>"}],
     "model": ..., "usage": {"prompt_tokens": n, "total_tokens": n}}

Any registered text-embedding model serves it (processing kind text-embedding; the demo's
all-minilm-l6-v2 runs on the embedding-workers). The texts go through the batcher as predict requests
(at most the model's max_batch_size texts per request; longer lists are split and sent together), so
they share batches with the cache's and other clients' texts. base64 is the little-endian float32 bytes,
as OpenAI sends them (the openai SDK asks for it by default and decodes it). Errors use OpenAI's shape.
The gateway's ASGI fast path serves it (fast_path.py: FastAPI's routing cost more CPU per request than the
rest of the gateway's work); the FastAPI route documents it and answers through the same `answer`.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field

from unimodel.core import errors
from unimodel.core.context import RequestContext
from unimodel.core.modelconfig import TEXT_EMBEDDING
from unimodel.core.value_arrays import embeddings_of, texts_value
from unimodel.gateway import json_body, rate_limits
from unimodel.gateway.http_context import http_context, id_headers
from unimodel.gateway.openai.errors import error_body, error_headers
from unimodel.gateway.ports import OpenAiPorts

MAX_INPUTS = 2048  # OpenAI's limit of texts per request


class EmbeddingBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[str] | list[int] | list[list[int]] = Field(..., description="a text or a list of texts")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="must equal the model's dimension when given")
    user: str | None = None


def _texts(body: EmbeddingBody) -> list[str]:
    value = body.input
    texts = [value] if isinstance(value, str) else value
    if not texts:
        raise errors.InvalidArgument("input must not be empty", field="input")
    strings = [t for t in texts if isinstance(t, str)]
    if len(strings) != len(texts):
        raise errors.InvalidArgument("input: token arrays are not supported; send text", field="input")
    if len(texts) > MAX_INPUTS:
        raise errors.InvalidArgument(f"input has {len(texts)} texts; at most {MAX_INPUTS}", field="input")
    for i, t in enumerate(strings):
        if not t:
            raise errors.InvalidArgument(f"input[{i}] is an empty string", field="input")
    return strings


def _check_model(gw: OpenAiPorts, name: str) -> int:
    """The model's max batch size; refuses a model that is not a text-embedding model."""
    gw.require_ready(name)
    config = gw.configs().get(name)
    if config is not None and config.processing.kind != TEXT_EMBEDDING:
        served = sorted(c.name for c in gw.configs().values() if c.processing.kind == TEXT_EMBEDDING)
        raise errors.InvalidArgument(
            f"model {name!r} is not a text-embedding model (embedding models: {', '.join(served) or 'none'})",
            field="model", model=name,
        )
    return config.max_batch_size if config is not None and config.max_batch_size > 0 else 32


async def embed(gw: OpenAiPorts, body: EmbeddingBody, ctx: RequestContext) -> tuple[np.ndarray, int]:
    """float32 [n, dim] and the prompt tokens."""
    texts = _texts(body)
    per_request = _check_model(gw, body.model)

    async def part(chunk: list[str]) -> tuple[np.ndarray, int]:
        reply = await gw.predict(body.model, texts_value(chunk), {}, ctx, api="openai")
        found = embeddings_of(reply.output)
        if found is None:
            raise errors.InvalidArgument(f"model {body.model!r} is not a text-embedding model", field="model")
        return found[0], int(found[1].sum())

    chunks = [texts[i : i + per_request] for i in range(0, len(texts), per_request)]
    parts = await asyncio.gather(*(part(c) for c in chunks))
    vectors = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
    if body.dimensions is not None and body.dimensions != vectors.shape[1]:
        raise errors.InvalidArgument(
            f"dimensions {body.dimensions}: model {body.model!r} gives {vectors.shape[1]}-dim vectors only",
            field="dimensions",
        )
    return vectors, sum(p[1] for p in parts)


def response_body(model: str, vectors: np.ndarray, tokens: int, encoding: str) -> bytes:
    if encoding == "base64":
        items: list[Any] = [
            {"object": "embedding", "index": i, "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()}
            for i, v in enumerate(vectors)
        ]
    else:
        items = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
    doc = {"object": "list", "data": items, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


async def answer(
    gw: OpenAiPorts, raw: bytes, header: Callable[[str], str], scope: Mapping[str, Any]
) -> tuple[int, bytes, dict[str, str]]:
    """POST /v1/embeddings: (status, JSON body, headers), OpenAI's error shape on failure. `scope`: the ASGI
    scope (the key's token bucket is debited by the tokens embedded)."""
    try:
        body = json_body.parse_model(raw, EmbeddingBody)
        ctx = http_context(header, gw.settings.request_timeout_s)
        vectors, tokens = await embed(gw, body, ctx)
    except errors.UnimodelError as err:
        return err.http_status, error_body(err), error_headers(err)
    rate_limits.debit(scope, tokens)  # the key's tokens-per-minute limit
    return 200, response_body(body.model, vectors, tokens, body.encoding_format), id_headers(ctx)
