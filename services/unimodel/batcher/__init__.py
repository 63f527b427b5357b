"""batcher: per-model queues that group requests into batches and dispatch them through the router."""
