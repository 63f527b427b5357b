"""cache: semantic cache (exact match, vector similarity in Milvus); its request handling arrives with the cache issue."""
