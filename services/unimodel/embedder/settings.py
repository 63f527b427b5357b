from __future__ import annotations

from unimodel.core.settings import CommonSettings, register_settings


@register_settings
class EmbedderSettings(CommonSettings):
    service = "embedding-worker"
