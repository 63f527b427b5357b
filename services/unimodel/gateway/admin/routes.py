"""Administration routes: model registration (`POST /v1/models`, from the repository or a folder inside
the models root), a model's status, unregistration, and the cache's hit log.

Registration and unregistration need an admin key (auth.ADMIN_ROUTES; the middleware answers 403 before
these handlers run). A tenant sees a model's status without its config's paths, URLs, secret names and
options (config_views.py), and the hit log of its own scope only."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from unimodel.core import errors, modelconfig
from unimodel.core.context import RequestContext
from unimodel.gateway import catalog, json_body
from unimodel.gateway.auth import Principal, principal_of
from unimodel.gateway.cache_client import verdict_name
from unimodel.gateway.config_views import tenant_error, tenant_view
from unimodel.gateway.ports import AdminPorts
from unimodel.gateway.unified.errors import error_response
from unimodel.v1 import cache_pb2


class RegisterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="model name; alone: the folder of that name in the model repository")
    path: str | None = Field(None, description="model folder inside the gateway's models root (403 outside it)")
    config: dict[str, Any] | None = Field(
        None, description="ModelConfig fields overriding the folder's config.yaml (e.g. replicas, max_batch_size)"
    )


class InstanceStatus(BaseModel):
    id: str
    state: str
    error: str = ""
    inflight: int = 0


class ModelStatusReply(BaseModel):
    name: str
    state: str = Field(..., description="READY, LOADING, FAILED or UNAVAILABLE")
    registered: bool
    instances: list[InstanceStatus]
    errors: list[str] = Field(default_factory=list)
    config: dict[str, Any] | None = None


def model_status(entry: catalog.ModelEntry, caller: Principal) -> ModelStatusReply:
    """The model's status: in full for an admin; for a tenant without load error texts and with the
    tenant's view of the config (config_views.py)."""
    if caller.admin:
        return ModelStatusReply(
            name=entry.name,
            state=entry.state,
            registered=entry.registered,
            instances=[InstanceStatus(id=s.id, state=s.state, error=s.error, inflight=s.inflight) for s in entry.states],
            errors=entry.errors(),
            config=modelconfig.to_dict(entry.config) if entry.config is not None else None,
        )
    return ModelStatusReply(
        name=entry.name,
        state=entry.state,
        registered=entry.registered,
        instances=[
            InstanceStatus(id=s.id, state=s.state, error=tenant_error(s.error), inflight=s.inflight) for s in entry.states
        ],
        errors=[tenant_error(e) for e in entry.errors()][:1],
        config=modelconfig.to_dict(tenant_view(entry.config)) if entry.config is not None else None,
    )


_ADMIN_ONLY: dict[int | str, dict[str, object]] = {
    401: {"description": "no API key, or an unknown one (when keys are configured)"},
    403: {"description": "not an admin key: this route needs one of admin_api_keys (error code permission_denied)"},
}



def register_admin_routes(app: FastAPI, gw: AdminPorts) -> None:
    @app.post(
        "/v1/models",
        tags=["models"],
        summary="Register a model (from the repository by name, or a folder inside the models root)",
        status_code=202,
        response_model=ModelStatusReply,
        responses={
            400: {}, 404: {}, 503: {}, **_ADMIN_ONLY,
            403: {"description": "not an admin key (permission_denied), or a path outside the models root"},
        },
        openapi_extra=json_body.openapi_body(RegisterBody),
    )
    async def register_model(request: Request) -> ModelStatusReply:
        body = json_body.parse_model(await request.body(), RegisterBody)
        config = await gw.register_model(body.model_dump(exclude_none=True))
        entry = gw.models().get(config.name) or catalog.ModelEntry(config.name, (), config)
        return model_status(entry, principal_of(request.scope))

    @app.get(
        "/v1/models/{name:path}/status",
        tags=["models"],
        summary="A model's state on every worker instance (a tenant key: without paths, URLs, secret names, options)",
        response_model=ModelStatusReply,
        responses={404: {}},
    )
    async def get_model_status(request: Request, name: str) -> ModelStatusReply:
        entry = gw.models().get(name)
        if entry is None:
            raise errors.NotFound(f"model {name!r} not found", model=name)
        return model_status(entry, principal_of(request.scope))

    @app.delete(
        "/v1/models/{name:path}",
        tags=["models"],
        summary="Unregister a model: workers unload it (admin key)",
        response_model=ModelStatusReply,
        responses={404: {}, 503: {}, **_ADMIN_ONLY},
    )
    async def unregister_model(request: Request, name: str) -> ModelStatusReply:
        await gw.unregister_model(name)
        entry = gw.models().get(name) or catalog.ModelEntry(name, ())
        reply = model_status(entry, principal_of(request.scope))
        reply.state = "UNLOADING"
        return reply

    @app.get(
        "/v1/cache/log", tags=["cache"],
        summary="The most recent cache lookups of a scope (the hit log): the caller's tenant; an admin key may "
        "name another with x-unimodel-tenant",
    )
    async def cache_log(
        request: Request, model: str,
        limit: int = Query(100, ge=1, le=10_000, description="records to return, most recent first (1 to 10000)"),
    ) -> Response:
        ctx = RequestContext.new(gw.settings.request_timeout_s)
        tenant = principal_of(request.scope).tenant  # the key's tenant; only an admin's x-unimodel-tenant names one
        try:
            reply = await gw.cache.log(cache_pb2.CacheLogRequest(scope=cache_pb2.CacheScope(model=model, tenant=tenant), limit=limit), ctx)
        except errors.UnimodelError as exc:
            return error_response(exc)
        records = [
            {"time": r.time, "hit": r.hit, "exact": r.exact, "similarity": round(r.similarity, 6), "entry_id": r.entry_id,
             "query": r.query, "latency_ms": round(r.latency_ms, 3), "verdict": verdict_name(r.verdict),
             "verify_score": round(r.verify_score, 6)}
            for r in reply.records
        ]
        return Response(orjson.dumps({"model": model, "records": records}), 200, media_type="application/json")
