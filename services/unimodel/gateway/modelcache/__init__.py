"""ModelCache-compatible cache API over the cache service."""
