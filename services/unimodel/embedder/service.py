"""embedding-worker runtime: joins the cluster (etcd lease, NATS, gRPC health) and drains on stop."""

from __future__ import annotations

from unimodel.core.lifecycle import Service
from unimodel.embedder.settings import EmbedderSettings


class EmbedderService(Service):
    kind = "embedding-worker"
    settings: EmbedderSettings
