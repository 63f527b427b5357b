"""Generated protobuf and gRPC code for protos/unimodel/v1 (scripts/gen_protos.py)."""
