"""Service kinds that other services tell apart (InstanceInfo.kind, etcd instance keys), in one place."""

BATCHER = "batcher"
ROUTER = "router"
GPU_WORKER = "gpu-worker"
EMBEDDING_WORKER = "embedding-worker"
WORKER_KINDS = (GPU_WORKER, EMBEDDING_WORKER)
"""The kinds that host models (their InstanceInfo lists models, engines and model states)."""

CACHE = "cache"
SERVICE_KINDS = ("gateway", ROUTER, BATCHER, CACHE, EMBEDDING_WORKER, GPU_WORKER)
"""The six services of a cluster (`unimodel status` reports a kind with no instance)."""
