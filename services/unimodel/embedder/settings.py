from __future__ import annotations

from pydantic import Field

from unimodel.core.settings import register_settings
from unimodel.worker.settings import WorkerSettings


@register_settings
class EmbedderSettings(WorkerSettings):
    """An embedding-worker is a worker that hosts text-embedding models only (ONNX Runtime); the router
    places registered `processing: text-embedding` models on embedding-workers when there are any."""

    service = "embedding-worker"

    models: str = Field("", description="built-in models to host, comma separated (pinned)")
