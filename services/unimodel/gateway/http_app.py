"""The gateway's FastAPI application: error handlers (UniModel's error shape for anything the API
families do not answer themselves), health and metrics routes. The API families add their routes."""

from __future__ import annotations

import logging
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from unimodel import __version__
from unimodel.core import errors
from unimodel.gateway.ports import Metrics, ModelView
from unimodel.gateway.unified.errors import JsonResponse, error_response, routing_error_response

log = logging.getLogger(__name__)


class HttpAppPorts(ModelView, Metrics, Protocol):
    """Readiness and the metrics registry."""


def build_app(gw: HttpAppPorts) -> FastAPI:
    app = FastAPI(
        title="UniModel gateway",
        version=__version__,
        description="One gateway for every kind of model. Errors are JSON: {\"error\": {\"code\", \"message\"}}.",
        default_response_class=JsonResponse,
    )

    @app.exception_handler(errors.UnimodelError)
    async def _unimodel_error(_request: Request, exc: errors.UnimodelError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> Response:
        # query and path parameters only: no route takes a FastAPI body parameter (bodies: json_body)
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return error_response(errors.InvalidArgument(f"{where}: {first.get('msg', 'invalid value')}", field=where))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        return routing_error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> Response:
        log.error("unhandled error: %s", exc, exc_info=exc)
        return error_response(errors.Internal("internal error"))

    @app.get("/health/live", tags=["health"], summary="The gateway process is up")
    async def live() -> dict[str, str]:
        return {"status": "live"}

    @app.get(
        "/health/ready",
        tags=["health"],
        summary="200 once the cluster can serve (NATS, etcd, router, batcher, a model); 503 otherwise and while the gateway stops",
        responses={503: {"description": "not ready; the body lists the failing checks"}},
    )
    async def ready() -> JsonResponse:
        checks = gw.readiness()
        ok = all(checks.values())
        return JsonResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics of the gateway")
    async def metrics() -> Response:
        return Response(generate_latest(gw.metrics_registry), media_type=CONTENT_TYPE_LATEST)

    return app
