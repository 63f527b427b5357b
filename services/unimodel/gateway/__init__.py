"""gateway: the public surface (REST + gRPC); validates, then hands requests to the batcher."""
