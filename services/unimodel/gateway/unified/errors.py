"""UniModel's own error shape, on every route but the OpenAI (openai/errors.py) and KServe ones
(kserve/errors.py): `{"error": {"code", "message", ...details}}` with the HTTP status of the error and
Retry-After when it has one."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import Response

from unimodel.core import errors

Headers = list[tuple[bytes, bytes]]


class JsonResponse(Response):
    """JSON rendered by orjson (FastAPI's ORJSONResponse is deprecated)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_result(err: errors.UnimodelError) -> tuple[int, bytes, Headers]:
    """(status, body, headers) of the error."""
    headers: Headers = []
    if err.retry_after_s:
        headers.append((b"retry-after", str(max(1, round(err.retry_after_s))).encode()))
    return err.http_status, orjson.dumps(err.to_json()), headers


def error_response(err: errors.UnimodelError) -> Response:
    status, body, headers = error_result(err)
    return Response(body, status, headers={k.decode(): v.decode() for k, v in headers}, media_type="application/json")



def routing_error_response(status: int, detail: str) -> Response:
    """Starlette's own 404 (no route) and 405 (method not allowed), in the same shape."""
    code = "NOT_FOUND" if status == 404 else "INVALID_ARGUMENT"
    return JsonResponse({"error": {"code": code, "message": detail}}, status_code=status)
