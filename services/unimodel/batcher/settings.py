from __future__ import annotations

from pydantic import Field

from unimodel.core.settings import BatchSenderSettings, register_settings


@register_settings
class BatcherSettings(BatchSenderSettings):
    """Defaults for models without a registered ModelConfig (e.g. the built-in echo); a registered
    model's `max_batch_size` and `batching` section take precedence (max_queue_size 0 there = this one)."""

    service = "batcher"

    max_batch_size: int = Field(
        32, ge=1, le=65536, description="most rows in one batch (a request adds its rows, 1 if unset)"
    )
    max_queue_delay_ms: float = Field(
        0.0, ge=0, le=60000, description="max wait after the first request for more to join its batch"
    )
    max_queue_size: int = Field(1024, ge=1, description="requests queued per model before answering 429")
    max_queue_share: float = Field(
        0.5, gt=0, le=1,
        description="fraction of a model's max_queue_size one tenant may hold: a tenant with max(1, "
        "floor(share * size)) requests queued gets 429 while other tenants still queue; requests without a tenant "
        "(no API keys, admins) are not counted; 1 = no per-tenant limit",
    )
    max_inflight_batches: int = Field(
        64, ge=1, le=4096,
        description="most batches of one model dispatched at once; below it, the router's BatchAck.capacity "
        "(batches the model's instances run at once) sets the number, so under load batches fill while "
        "every instance is busy",
    )
    queue_idle_s: float = Field(60.0, gt=0, description="an empty model queue is dropped after this long")
