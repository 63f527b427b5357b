from __future__ import annotations

from pydantic import Field, field_validator

from unimodel.core.settings import CommonSettings, register_settings


@register_settings
class WorkerSettings(CommonSettings):
    service = "gpu-worker"

    models: str = Field("echo", description="built-in models to host, comma separated")
    max_concurrent_batches: int = Field(8, ge=1, le=4096, description="batches run at once on this worker")

    @field_validator("models")
    @classmethod
    def _models(cls, v: str) -> str:
        from unimodel.worker.engines import BUILTIN_ENGINES

        for name in cls._split(v):
            if name not in BUILTIN_ENGINES:
                raise ValueError(f"unknown built-in model {name!r}; known: {', '.join(sorted(BUILTIN_ENGINES))}")
        return v

    @property
    def model_list(self) -> list[str]:
        return self._split(self.models)
