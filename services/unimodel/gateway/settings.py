from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from unimodel.core import modelconfig
from unimodel.core.settings import CommonSettings, LocalPath, register_settings


class KeyPolicy(BaseModel):
    """One API key's tenant and limits (the value of an `api_keys` entry given as an object)."""

    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(..., min_length=1, max_length=128, description="tenant the key acts for")
    requests_per_minute: int | None = Field(
        None, ge=1, le=10_000_000, description="requests this key may start per minute (429 above; default: "
        "default_requests_per_minute)",
    )
    tokens_per_minute: int | None = Field(
        None, ge=1, le=10_000_000_000, description="prompt + generated tokens per minute (429 above; default: "
        "default_tokens_per_minute)",
    )
    priority: bool = Field(False, description="the key may set KServe's `priority` parameter (admin keys always may)")


@register_settings
class GatewaySettings(CommonSettings):
    service = "gateway"

    # Triton's defaults: HTTP on 8000, gRPC on 8001.
    http_port: int = Field(8000, ge=0, le=65535, description="HTTP port (REST, /metrics); 0 = any free port")
    grpc_port: int = Field(8001, ge=0, le=65535, description="gRPC port (InferenceService, health); 0 = any")
    max_body_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="largest request body accepted (413 above); what the bus carries is "
        "limited too, by nats-server's max_payload (64 MiB in unimodel up and compose): a request that is bigger once "
        "encoded is 413 naming that limit",
    )
    offload_body_bytes: int = Field(
        64 * 1024, ge=0, description=":predict bodies (and answers) of this many bytes or more are decoded and encoded "
        "in helper processes, off the event loop (0: never)",
    )
    big_transfer_bytes_per_s: int = Field(
        32 * 1024 * 1024, ge=0, description="past its first 4 MiB, a :predict or KServe infer body is read and a big answer sent at most "
        "this fast, so the requests around it keep their latency (gateway/pacing.py; 0: unpaced)",
    )
    offload_processes: int = Field(
        2, ge=0, le=64, description="helper processes for big bodies (offload_body_bytes), started on first use (0: none)"
    )
    model_repository: LocalPath = Field(
        "", description="model repository folder: POST /v1/models {\"name\": ...} registers <repository>/<name>"
    )
    models_root: LocalPath = Field(
        "", description="folder under which POST /v1/models may register a model by path (default: the repository)"
    )
    load_models: str = Field(
        "", description="models of the repository to register at start: comma separated names, or 'all'"
    )
    generate_timeout_s: float = Field(
        600.0, gt=0, le=86400, description="deadline of a text generation (chat / completions), queueing included"
    )
    api_keys: dict[str, str | KeyPolicy] = Field(
        default_factory=dict,
        description="tenant API keys -> tenant name, or {\"tenant\": ..., \"requests_per_minute\": ..., "
        "\"tokens_per_minute\": ..., \"priority\": ...}; when any key is set, every route but /health/* and /chat "
        "needs Authorization: Bearer <key> (401 otherwise). Env: UNIMODEL_API_KEYS='{\"sk-...\": \"team-a\"}'",
    )
    admin_api_keys: dict[str, str] = Field(
        default_factory=dict,
        description="admin API keys -> admin names: model registration, cache operations across tenants, full "
        "configs. Env: UNIMODEL_ADMIN_API_KEYS='{\"sk-root\": \"ops\"}'",
    )
    insecure_open: bool = Field(
        False, description="serve with no API keys on a non-loopback address (anyone who reaches it administers "
        "it); without keys and without this, the gateway refuses to bind anything but loopback",
    )
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="browser origins (scheme://host:port) allowed to open the websocket; default: the gateway's own",
    )
    default_requests_per_minute: int = Field(
        0, ge=0, le=10_000_000, description="requests per minute of a tenant key without its own limit; 0 = no limit"
    )
    default_tokens_per_minute: int = Field(
        0, ge=0, le=10_000_000_000, description="tokens per minute of a tenant key without its own limit; 0 = no limit"
    )
    upstream_urls: list[modelconfig.UpstreamUrlPrefix] = Field(
        default_factory=list,
        description="URL prefixes an `openai`-engine model's llm.upstream_url may start with (none by default: "
        "registering such a model is refused)",
    )
    upstream_key_envs: list[modelconfig.UpstreamKeyEnv] = Field(
        default_factory=list,
        description="environment variables a model's llm.upstream_api_key_env may name (none by default)",
    )
    cache_timeout_s: float = Field(
        0.5, gt=0, le=60, description="longest a chat request waits for the cache lookup before going to the model "
        "(marked bypassed)",
    )
