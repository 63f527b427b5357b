"""UniModel's own API: :predict over HTTP and gRPC, gRPC Generate, the model list."""
