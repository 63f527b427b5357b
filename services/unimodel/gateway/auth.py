"""Who may call the gateway, and what they may do: API keys (tenant and admin), roles per route and per gRPC
method, the websocket's Origin check, and the rule for a gateway with no keys.

Keys: `api_keys` (key -> tenant, or a KeyPolicy) and `admin_api_keys` (key -> admin name). A request presents
`Authorization: Bearer <key>` (or `x-api-key: <key>`; gRPC: the same metadata). The middleware is always
installed: it resolves the key to a Principal, puts it in the ASGI scope (`scope[PRINCIPAL_KEY]`) and rewrites
`x-unimodel-tenant` to the principal's tenant, so every route reads the verified tenant from that header and
it travels with the request (BatchItem.tenant) to every service.

- Tenant key: tenant = the key's tenant; a client-sent x-unimodel-tenant is dropped.
- Admin key: tenant "" (the shared scope) unless the admin sends x-unimodel-tenant: admins may act on any
  tenant's scope (its cache entries and hit log).
- No keys configured: every caller is ANONYMOUS (an admin, tenant ""); x-unimodel-tenant is ignored. Such a
  gateway binds only to loopback unless `insecure_open` is set (check_exposure), and refuses browser
  requests from other sites (an Origin that is neither its own nor in `allowed_origins`).

Websockets: a browser's Origin must be the gateway's own (the Host header's host and port) or listed in
`allowed_origins`; a client that sends no Origin (not a browser) is not checked.

Roles: ADMIN_ROUTES (HTTP) and GRPC_TENANT_METHODS (gRPC) are the one table of what needs which role; every
other HTTP route needs any key, every unlisted gRPC method needs an admin key. Refusals: 401 / UNAUTHENTICATED
without a (valid) key, 403 / PERMISSION_DENIED with a tenant key on an admin route; health (/health/*,
grpc.health.v1, reflection) and the static /chat page are open.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import grpc
from starlette.types import ASGIApp, Receive, Scope, Send

from unimodel.core import errors
from unimodel.core.grpc_server import refusing_handler
from unimodel.gateway.settings import GatewaySettings, KeyPolicy

TENANT_HEADER = "x-unimodel-tenant"
_TENANT = TENANT_HEADER.encode()
OPEN_PATHS = ("/health/",)
OPEN_PAGES = frozenset({"/chat", "/chat/"})
OPEN_GRPC = ("/grpc.health.v1.", "/grpc.reflection.")
PRINCIPAL_KEY = "unimodel.principal"
"""The ASGI scope entry holding the caller's verified Principal (gRPC: ApiKeys.principal_from_metadata)."""

TENANT_ROLE, ADMIN_ROLE = "tenant", "admin"

_ANY = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
ADMIN_ROUTES: tuple[tuple[frozenset[str], re.Pattern[str], str], ...] = (
    (frozenset({"POST"}), re.compile(r"^/v1/models/?$"), "registering a model"),
    (frozenset({"DELETE"}), re.compile(r"^/v1/models/."), "unregistering a model"),
    (frozenset({"POST"}), re.compile(r"^/v1/models/[^/]+[:/](load|unload|reload)$"), "loading or unloading a model"),
    (_ANY, re.compile(r"^/v2/repository(/|$)"), "the model repository extension"),
)
"""HTTP (method, path) -> admin only, with what the route does (for the 403's message). Every other route
but the open ones needs a tenant or an admin key; routes that show configs or cache logs narrow what a
tenant sees themselves (config_views.py, admin/routes.py)."""

_INFERENCE = "/unimodel.v1.InferenceService/"
_KSERVE = "/inference.GRPCInferenceService/"
GRPC_TENANT_METHODS = frozenset(
    [_INFERENCE + m for m in ("Predict", "ListModels", "Generate", "GenerateUnary")]
    + [
        _KSERVE + m
        for m in (
            "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig",
            "ModelStatistics", "ModelInfer", "ModelStreamInfer",
        )
    ]
)
"""gRPC methods any key may call (ModelConfig shows a tenant the redacted config). Every other method of the
gateway's services (KServe's repository, shared-memory, trace and log settings) needs an admin key; health
and reflection need none."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as the presented key says."""

    name: str
    """The tenant's name for a tenant key, the admin's name for an admin key, "anonymous" with no keys."""
    tenant: str
    """Cache scope and queue share the request uses ("" for the shared scope)."""
    admin: bool
    """May administer: register / unload models, every cache scope, full configs, KServe priority."""
    key_id: str
    """Stable, non-secret id of the key (rate-limit buckets, logs); "" with no keys."""
    policy: KeyPolicy | None = None
    """The key's limits (None: the settings' defaults)."""

    @property
    def role(self) -> str:
        return ADMIN_ROLE if self.admin else TENANT_ROLE


ANONYMOUS = Principal("anonymous", "", admin=True, key_id="")
"""The caller when no keys are configured (loopback-only unless insecure_open): one user, who administers."""
NOBODY = Principal("unauthenticated", "", admin=False, key_id="")
"""The caller of an open route (health, /chat) when keys are configured: no key was checked."""


def key_id(key: str) -> str:
    """A short, non-secret id of a key (the first 12 hex digits of its SHA-256): safe in logs and metrics."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def principal_of(scope: Scope) -> Principal:
    """The verified caller of an HTTP or websocket request (AuthMiddleware put it in the scope)."""
    principal = scope.get(PRINCIPAL_KEY)
    return principal if isinstance(principal, Principal) else ANONYMOUS


def require_admin(principal: Principal, what: str) -> None:
    """PermissionDenied unless the caller holds an admin key."""
    if not principal.admin:
        raise errors.PermissionDenied(
            f"{what} needs an admin API key (admin_api_keys); this key's role is {principal.role}",
            role=ADMIN_ROLE,
        )


class ApiKeys:
    """The key table: tenant keys (`api_keys`) and admin keys (`admin_api_keys`)."""

    def __init__(self, keys: Mapping[str, str | KeyPolicy], admin_keys: Mapping[str, str] | None = None) -> None:
        self._table: list[tuple[bytes, Principal]] = []
        for key, value in keys.items():
            if not key:
                continue
            policy = value if isinstance(value, KeyPolicy) else None
            tenant = value.tenant if isinstance(value, KeyPolicy) else value
            if not tenant:
                raise ValueError(f"api_keys: key {key_id(key)} names no tenant (a tenant key needs a tenant name)")
            self._table.append((key.encode(), Principal(tenant, tenant, admin=False, key_id=key_id(key), policy=policy)))
        for key, name in (admin_keys or {}).items():
            if not key:
                continue
            if key in keys:
                raise ValueError(f"admin_api_keys: key {key_id(key)} is also a tenant key in api_keys")
            self._table.append((key.encode(), Principal(name or "admin", "", admin=True, key_id=key_id(key))))
        self.enabled = bool(self._table)

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> ApiKeys:
        return cls(settings.api_keys, settings.admin_api_keys)

    def principal(self, authorization: str, api_key: str = "", tenant: str = "") -> Principal:
        """The caller of a request with these headers (`tenant`: its x-unimodel-tenant, honoured for admins
        only). ANONYMOUS when no keys are configured; Unauthenticated when the key is missing or unknown."""
        if not self.enabled:
            return ANONYMOUS
        token = ""
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer":
                token = value.strip()
        presented = (token or api_key.strip()).encode()
        if not presented:
            raise errors.Unauthenticated("missing API key: send Authorization: Bearer <key>")
        found: Principal | None = None
        for key, principal in self._table:  # constant-time comparison with every key
            if hmac.compare_digest(key, presented):
                found = principal
        if found is None:
            raise errors.Unauthenticated("invalid API key")
        if found.admin and tenant:
            return Principal(found.name, tenant, admin=True, key_id=found.key_id)
        return found

    def principal_from_metadata(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        """gRPC: the caller named by the call's `authorization` (or `x-api-key`) metadata; an admin may add
        `x-unimodel-tenant`. ANONYMOUS when no keys are configured (the tenant metadata is then ignored)."""
        if not self.enabled:
            return ANONYMOUS
        md = {k.lower(): (v.decode() if isinstance(v, bytes) else v) for k, v in (metadata or ())}
        return self.principal(md.get("authorization", ""), md.get("x-api-key", ""), md.get(TENANT_HEADER, ""))

    def tenant_from_metadata(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        """gRPC: the tenant the call acts for ("" with no keys)."""
        return self.principal_from_metadata(metadata).tenant


def admin_route(method: str, path: str) -> str:
    """What the route does when it is admin-only ("" when any key may call it)."""
    for methods, pattern, what in ADMIN_ROUTES:
        if method in methods and pattern.match(path):
            return what
    return ""


def grpc_needs_admin(method: str) -> bool:
    return method not in GRPC_TENANT_METHODS


# websocket origins -------------------------------------------------------------------------------------------
_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def _hostport(netloc: str, scheme: str) -> str:
    netloc = netloc.lower()
    port = _DEFAULT_PORTS.get(scheme)
    return netloc[: -len(port) - 1] if port and netloc.endswith(":" + port) else netloc


def origin_allowed(origin: str, host: str, allowed: Iterable[str]) -> bool:
    """A browser's Origin may open the websocket when it is the gateway's own origin (its host and port
    are the request's Host) or listed in `allowed_origins`. No Origin (a non-browser client): allowed."""
    if not origin:
        return True
    normalized = origin.strip().rstrip("/").lower()
    if normalized in {a.strip().rstrip("/").lower() for a in allowed}:
        return True
    parts = urlsplit(normalized)
    if parts.scheme not in _DEFAULT_PORTS or not parts.netloc or not host:
        return False  # "null" (a sandboxed page, a file:// page) and anything else that is not an origin
    return _hostport(parts.netloc, parts.scheme) == _hostport(host, parts.scheme)


# no keys: loopback only --------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(settings: GatewaySettings, keys: ApiKeys) -> str:
    """Without keys the gateway serves loopback only: ValueError for another address unless insecure_open.
    Returns the one warning line to log at start ("" with keys)."""
    if keys.enabled:
        return ""
    host = settings.host
    if is_loopback(host):
        return (
            f"WARNING: no API keys configured: every caller administers this gateway (bound to loopback {host} "
            "only; set api_keys and admin_api_keys to serve other hosts)"
        )
    if not settings.insecure_open:
        raise ValueError(
            f"no API keys configured and host {host!r} is not loopback: anyone who reaches it would administer "
            "this gateway. Set api_keys and admin_api_keys (UNIMODEL_API_KEYS, UNIMODEL_ADMIN_API_KEYS), bind "
            "127.0.0.1, or set insecure_open to serve it open anyway"
        )
    return (
        f"WARNING: no API keys configured and insecure_open is set: anyone who reaches {host} administers this "
        "gateway (registers and unloads models, reads every cache scope)"
    )


# HTTP and websocket ------------------------------------------------------------------------------------------
class AuthMiddleware:
    """Outer ASGI layer, always installed: resolves the caller (401 without a valid key when keys are
    configured), checks the route's role (403), checks a browser websocket's Origin, puts the Principal in
    the scope and rewrites x-unimodel-tenant to its tenant. Error bodies come from `error_body(err)` (app.py
    gives OpenAI's shape, which every OpenAI client parses)."""

    def __init__(
        self, app: ASGIApp, keys: ApiKeys, error_body: Callable[[errors.UnimodelError], bytes],
        allowed_origins: Iterable[str] = (),
    ) -> None:
        self.app, self.keys, self.error_body = app, keys, error_body
        self.allowed_origins = tuple(allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        authorization = api_key = tenant = origin = host = ""
        kept = []
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"x-api-key":
                api_key = value.decode("latin-1")
            elif name == _TENANT:
                tenant = value.decode("latin-1")
                continue  # only the key decides the tenant
            elif name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"host":
                host = value.decode("latin-1")
            kept.append((name, value))
        try:
            if (kind == "websocket" or not self.keys.enabled) and not origin_allowed(origin, host, self.allowed_origins):
                # a browser websocket from another site; without keys any cross-site browser request (a page
                # elsewhere would otherwise administer a loopback gateway through its visitor's browser)
                raise errors.PermissionDenied(f"origin {origin[:100]!r} is not allowed (allowed_origins)", field="origin")
            if path.startswith(OPEN_PATHS) or path in OPEN_PAGES:
                principal = NOBODY if self.keys.enabled else ANONYMOUS
            else:
                principal = self.keys.principal(authorization, api_key, tenant)
                what = admin_route(scope.get("method", "GET"), path) if kind == "http" else ""
                if what:
                    require_admin(principal, what)
        except errors.UnimodelError as err:
            await self._refuse(kind, err, send)
            return
        scope = dict(scope)
        scope[PRINCIPAL_KEY] = principal
        if principal.tenant:
            kept.append((_TENANT, principal.tenant.encode()))
        scope["headers"] = kept
        await self.app(scope, receive, send)

    async def _refuse(self, kind: str, err: errors.UnimodelError, send: Send) -> None:
        if kind == "websocket":  # refused before the handshake completes: HTTP 403 to the client
            await send({"type": "websocket.close", "code": 1008, "reason": err.message[:120]})
            return
        body = self.error_body(err)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if err.http_status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="unimodel"'))
        await send({"type": "http.response.start", "status": err.http_status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


# gRPC -------------------------------------------------------------------------------------------------------
class GrpcAuthInterceptor(grpc.aio.ServerInterceptor):
    """gRPC, installed when keys are configured: every method but health and reflection needs a configured
    key (UNAUTHENTICATED otherwise), admin methods an admin key (PERMISSION_DENIED). Servicers read the
    caller with ApiKeys.principal_from_metadata."""

    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.startswith(OPEN_GRPC):
            return await continuation(handler_call_details)
        try:
            principal = self.keys.principal_from_metadata(handler_call_details.invocation_metadata)
            if grpc_needs_admin(method):
                require_admin(principal, f"gRPC method {method}")
        except errors.UnimodelError as exc:
            return refusing_handler(exc, await continuation(handler_call_details))
        return await continuation(handler_call_details)
