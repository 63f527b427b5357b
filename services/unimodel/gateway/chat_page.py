"""The chat page (GET /chat): one self-contained HTML file that talks to the gateway's OpenAI API.

The page is static: it lists models with GET /v1/models and streams replies from
POST /v1/chat/completions in the browser. Nothing here touches the cluster.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

PAGE = "chat.html"
_INLINE = re.compile(rb"<(script|style)>(.*?)</\1>", re.DOTALL)


def load_page() -> bytes:
    """The page as shipped in the package (unimodel/gateway/static/chat.html)."""
    return resources.files("unimodel.gateway").joinpath("static", PAGE).read_bytes()


def content_security_policy(page: bytes) -> str:
    """A CSP that allows exactly the page's own inline <script> and <style> blocks (by hash), fetches
    to this origin only, and nothing else: model output can never load or run anything."""
    hashes: dict[bytes, list[str]] = {b"script": [], b"style": []}
    for tag, body in _INLINE.findall(page):
        hashes[tag].append("'sha256-" + base64.b64encode(hashlib.sha256(body).digest()).decode() + "'")
    return "; ".join(
        [
            "default-src 'none'",
            "script-src " + (" ".join(hashes[b"script"]) or "'none'"),
            "style-src " + (" ".join(hashes[b"style"]) or "'none'"),
            "connect-src 'self'",
            "img-src 'self' data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


def register_chat_page(app: FastAPI) -> None:
    """Add GET /chat (documented in OpenAPI as text/html). The file is read once, here."""
    page = load_page()
    headers = {
        "Content-Security-Policy": content_security_policy(page),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }

    @app.get(
        "/chat",
        tags=["ui"],
        summary="Chat page: talk to a generative model from the browser (uses /v1/chat/completions)",
        response_class=HTMLResponse,
        responses={200: {"description": "the chat page (a single HTML file)"}},
    )
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(page, headers=headers)
