"""embedding-worker: text embeddings on ONNX Runtime (the worker runtime, text-embedding models only)."""
