from __future__ import annotations

from pydantic import Field

from unimodel.core.settings import CommonSettings, register_settings


@register_settings
class RouterSettings(CommonSettings):
    service = "router"

    retries: int = Field(1, ge=0, le=5, description="times a batch is sent to another instance when one is lost")
    try_timeout_s: float = Field(30.0, gt=0, le=3600, description="max wait for one worker's reply")
    suspend_s: float = Field(
        2.0, ge=0, le=600, description="how long an instance that did not answer gets no traffic (unless no other)"
    )
    reconcile_interval_s: float = Field(
        1.0, gt=0, le=60, description="how often model placement is checked against what workers host"
    )
    command_timeout_s: float = Field(5.0, gt=0, le=600, description="max wait for a worker to accept a load/unload")
