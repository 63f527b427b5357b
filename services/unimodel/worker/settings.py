from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator

from unimodel.core import modelconfig
from unimodel.core.settings import CommonSettings, LocalPath, register_settings


@register_settings
class WorkerSettings(CommonSettings):
    service = "gpu-worker"

    models: str = Field("echo", description="built-in models to host, comma separated (pinned)")
    model_repository: LocalPath = Field("", description="model repository folder (<repo>/<model>/config.yaml + files)")
    load: str = Field("", description="models of the repository to load at start, comma separated (pinned)")
    max_concurrent_batches: int = Field(8, ge=1, le=4096, description="batches run at once on this worker")
    processing_threads: int = Field(2, ge=1, le=256, description="threads for pre/post-processing (decode, tokenize)")
    upstream_urls: list[modelconfig.UpstreamUrlPrefix] = Field(
        default_factory=list,
        description="URL prefixes an `openai`-engine model's llm.upstream_url may start with, checked again here "
        "(the gateway checks its own): none by default, so such a model fails to load",
    )
    upstream_key_envs: list[modelconfig.UpstreamKeyEnv] = Field(
        default_factory=list,
        description="environment variables of this worker that a model's llm.upstream_api_key_env may name "
        "(none by default)",
    )

    @field_validator("models")
    @classmethod
    def _models(cls, v: str) -> str:
        from unimodel.worker.models import BUILTIN_MODELS

        for name in cls._split(v):
            if name not in BUILTIN_MODELS:
                raise ValueError(f"unknown built-in model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
        return v

    @field_validator("model_repository")
    @classmethod
    def _repository(cls, v: str) -> str:
        if v and not Path(v).is_dir():
            raise ValueError(f"{v!r} is not a folder")
        return v

    @field_validator("load")
    @classmethod
    def _load(cls, v: str, info: ValidationInfo) -> str:
        names = cls._split(v)
        if not names:
            return v
        repo = info.data.get("model_repository")
        if not repo:
            raise ValueError("needs --model-repository (the folder the models are loaded from)")
        from unimodel.core import errors

        builtins = set(cls._split(info.data.get("models") or ""))
        for name in names:
            if name in builtins:
                raise ValueError(f"{name!r} is also a built-in model (--models)")
            try:
                config = modelconfig.load(Path(repo) / name)
            except errors.UnimodelError as exc:
                raise ValueError(f"model {name!r}: {' '.join(exc.message.split())}") from None
            if config.name != name:
                raise ValueError(f"model folder {name!r} holds model {config.name!r}")
        return v

    @property
    def model_list(self) -> list[str]:
        return self._split(self.models)

    @property
    def load_list(self) -> list[str]:
        return self._split(self.load)

    def upstream_policy(self) -> modelconfig.UpstreamPolicy:
        """What an openai-engine model may name on this worker (upstream_urls / upstream_key_envs)."""
        return modelconfig.UpstreamPolicy(tuple(self.upstream_urls), tuple(self.upstream_key_envs), where="the gpu-worker")
