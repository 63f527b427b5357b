"""UniModel: a unified, distributed model-serving engine."""

__version__ = "0.1.0"
