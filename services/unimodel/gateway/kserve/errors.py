"""Triton's error shape on every /v2 route: {"error": "<message>"} (tritonclient raises
InferenceServerException with that message), with the status of our error tree (400 bad input, 404 unknown
model, 413, 429 / 503 with Retry-After, 504)."""

from __future__ import annotations

import orjson
from fastapi.responses import Response

from unimodel.core import errors

Headers = list[tuple[bytes, bytes]]
JSON = b"application/json"


def error_result(err: errors.UnimodelError) -> tuple[int, bytes, Headers]:
    """(status, body, headers) of the error."""
    headers: Headers = []
    if err.retry_after_s:
        headers.append((b"retry-after", str(max(1, round(err.retry_after_s))).encode()))
    return err.http_status, orjson.dumps({"error": err.message}), headers


def response(status: int, body: bytes, headers: Headers | None = None, content_type: bytes = JSON) -> Response:
    out = Response(body, status, media_type=content_type.decode())
    for k, v in headers or ():
        out.headers.append(k.decode(), v.decode())
    return out


def error_response(err: errors.UnimodelError) -> Response:
    status, body, headers = error_result(err)
    return response(status, body, headers)
