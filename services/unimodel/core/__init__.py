"""Shared core of every UniModel service: settings, lifecycle, errors, bus, registry, telemetry."""
