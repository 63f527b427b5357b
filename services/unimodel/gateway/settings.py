from __future__ import annotations

from pydantic import Field

from unimodel.core.settings import CommonSettings, LocalPath, register_settings


@register_settings
class GatewaySettings(CommonSettings):
    service = "gateway"

    # Triton's defaults: HTTP on 8000, gRPC on 8001.
    http_port: int = Field(8000, ge=0, le=65535, description="HTTP port (REST, /metrics); 0 = any free port")
    grpc_port: int = Field(8001, ge=0, le=65535, description="gRPC port (InferenceService, health); 0 = any")
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="largest request body accepted (413 above)")
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
    api_keys: dict[str, str] = Field(
        default_factory=dict,
        description="API keys -> tenant names; when set, every route but /health/* and /chat needs "
        "Authorization: Bearer <key> (401 otherwise). Env: UNIMODEL_API_KEYS='{\"sk-...\": \"team-a\"}'",
    )
    cache_timeout_s: float = Field(
        0.5, gt=0, le=60, description="longest a chat request waits for the cache lookup before going to the model "
        "(marked bypassed)",
    )
