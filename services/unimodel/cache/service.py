"""cache runtime: joins the cluster (etcd lease, NATS, gRPC health) and drains on stop."""

from __future__ import annotations

from unimodel.core.lifecycle import Service
from unimodel.cache.settings import CacheSettings


class CacheService(Service):
    kind = "cache"
    settings: CacheSettings
