"""The gateway's composition: the one place that knows every part.

HTTP, outermost first: tracing (server spans), API keys and roles (auth.py), the body limit, the fast path
(:predict, KServe infer, POST /modelcache straight from ASGI), then the FastAPI app with the routes of
every API family — UniModel's own (unified/), model administration (admin/), KServe v2 (kserve/), OpenAI
(openai/), ModelCache (modelcache/) — health, metrics and the /chat page. gRPC: UniModel's
InferenceService and KServe's GRPCInferenceService. Each family sees only its ports (ports.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import FastAPI
from starlette.types import ASGIApp

from unimodel.core import errors
from unimodel.core.grpc_server import GrpcServer
from unimodel.gateway.admin.routes import register_admin_routes
from unimodel.gateway.auth import AuthMiddleware
from unimodel.gateway.body_limit import BodyLimit
from unimodel.gateway.chat_page import register_chat_page
from unimodel.gateway.fast_path import FastRoutes
from unimodel.gateway.http_app import build_app
from unimodel.gateway.kserve.errors import error_result as kserve_error_result
from unimodel.gateway.kserve.grpc import add_kserve_grpc
from unimodel.gateway.kserve.http import register_kserve_routes
from unimodel.gateway.modelcache.routes import register_modelcache_routes
from unimodel.gateway.openai.errors import error_body as openai_error_body
from unimodel.gateway.openai.routes import register_openai_routes
from unimodel.gateway.ports import GatewayPorts
from unimodel.gateway.rate_limits import Headers, RateLimitMiddleware
from unimodel.gateway.traces import TracingMiddleware
from unimodel.gateway.unified.errors import error_result as unified_error_result
from unimodel.gateway.unified.grpc import InferenceApi
from unimodel.gateway.unified.http import register_unified_routes
from unimodel.v1 import services_pb2, services_pb2_grpc


@dataclass(frozen=True)
class HttpSurface:
    api: FastAPI
    """Every documented route (and the OpenAPI document)."""
    app: ASGIApp
    """What uvicorn serves: api behind the fast path, the body limit, API keys and tracing."""


def compose_http(gw: GatewayPorts) -> HttpSurface:
    api = build_app(gw)
    register_unified_routes(api, gw)
    register_admin_routes(api, gw)
    register_kserve_routes(api, gw)
    register_openai_routes(api, gw)
    register_modelcache_routes(api, gw)
    register_chat_page(api)
    app: ASGIApp = BodyLimit(FastRoutes(api, gw), gw.settings.max_body_bytes)
    if gw.rate_limiter.enabled:  # per-key rpm / tpm, inside the key check (it reads the Principal)
        app = RateLimitMiddleware(app, gw.rate_limiter, _family_error)
    app = AuthMiddleware(app, gw.auth, openai_error_body, gw.settings.allowed_origins)  # always: roles, tenant, Origin
    return HttpSurface(api, TracingMiddleware(app))  # a flag check per request while tracing is off


_OPENAI_PATHS = ("/v1/chat/", "/v1/completions", "/v1/embeddings", "/v1/audio/")


def _family_error(path: str, err: errors.UnimodelError) -> tuple[int, bytes, Headers]:
    """A refusal in the error shape of the path's API family (OpenAI, KServe v2, UniModel's own)."""
    if path.startswith("/v2"):
        return kserve_error_result(err)
    if path.startswith(_OPENAI_PATHS):
        retry = [(b"retry-after", str(max(1, round(err.retry_after_s))).encode())] if err.retry_after_s else []
        return err.http_status, openai_error_body(err), retry
    return unified_error_result(err)


def add_grpc_services(server: GrpcServer, gw: GatewayPorts) -> None:
    server.add(
        services_pb2_grpc.add_InferenceServiceServicer_to_server,
        InferenceApi(gw),
        services_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    )
    add_kserve_grpc(server, gw)
