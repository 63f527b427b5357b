"""Model administration: registration, status, unregistration, the cache's hit log."""
