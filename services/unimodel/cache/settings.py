from __future__ import annotations

from unimodel.core.settings import CommonSettings, register_settings


@register_settings
class CacheSettings(CommonSettings):
    service = "cache"
