"""OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}` with the HTTP status of the
error (and Retry-After when it has one): what every OpenAI client parses. The gateway's API-key check
answers in this shape on every route (auth.py); a stream that fails after it began ends with the same
body as an SSE event."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import Response

from unimodel.core import errors

_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
    409: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
}
_CODES = {"NOT_FOUND": "model_not_found", "UNAUTHENTICATED": "invalid_api_key"}


def error_body(err: errors.UnimodelError) -> bytes:
    status = err.http_status
    meta = err.metadata
    doc: dict[str, Any] = {
        "error": {
            "message": err.message,
            "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": meta.get("field") or None,
            "code": meta.get("limit") or _CODES.get(err.code_name) or err.code_name.lower(),
        }
    }
    return orjson.dumps(doc)


def error_headers(err: errors.UnimodelError) -> dict[str, str]:
    """Retry-After when the error has one."""
    return {"retry-after": str(max(1, round(err.retry_after_s)))} if err.retry_after_s else {}


def openai_error(err: errors.UnimodelError) -> Response:
    return Response(error_body(err), err.http_status, headers=error_headers(err), media_type="application/json")


def error_event(err: errors.UnimodelError) -> bytes:
    """The error as the last SSE event of a stream that already began."""
    return b"data: " + error_body(err) + b"\n\n"
