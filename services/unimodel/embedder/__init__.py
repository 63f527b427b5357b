"""embedding-worker: text embeddings on ONNX Runtime; its engine arrives with the cache/embedding issue."""
