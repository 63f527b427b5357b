"""The body limit (settings.max_body_bytes), the outermost HTTP layer: 413 in the shape of the route's API.

The bus has a limit too (nats-server's max_payload, 64 MiB by default, core/payload_limits.py): a body under
this one whose encoded request is over that is refused by the gateway before publishing, also with 413."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from unimodel.core import errors, payload_limits
from unimodel.gateway.kserve.errors import error_response as kserve_error_response
from unimodel.gateway.unified.errors import error_response


class BodyLimit:
    """Outermost ASGI layer: 413 for bodies over the limit, by Content-Length up front or, while the body
    streams in, by raising PayloadTooLarge from `receive` (the route's error handling answers it)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.message = (
            f"request body exceeds the limit of {max_bytes} bytes ({payload_limits.mib(max_bytes)}; the gateway's max_body_bytes)"
        )

    def too_large(self) -> errors.PayloadTooLarge:
        return errors.PayloadTooLarge(self.message, limit=str(self.max_bytes))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                # KServe clients expect {"error": "<message>"}
                render = kserve_error_response if scope["path"].startswith("/v2") else error_response
                await render(self.too_large())(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self.too_large()
            return message

        await self.app(scope, limited, send)

