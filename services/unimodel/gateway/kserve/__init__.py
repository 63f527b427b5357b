"""KServe v2 / Open Inference Protocol (Triton's flavour): codec, documents, REST and gRPC surfaces."""
