from __future__ import annotations

from pydantic import Field

from unimodel.core.settings import BatchSenderSettings, register_settings


@register_settings
class RouterSettings(BatchSenderSettings):
    service = "router"

    reconcile_interval_s: float = Field(
        1.0, gt=0, le=60, description="how often model placement is checked against what workers host"
    )
    command_timeout_s: float = Field(5.0, gt=0, le=600, description="max wait for a worker to accept a load/unload")
