from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.support import Infra, Services


@pytest.fixture
def infra(tmp_path: Path) -> Iterator[Infra]:
    infra = Infra(tmp_path)
    try:
        infra.start()
        yield infra
    finally:
        infra.stop()


@pytest.fixture
def services(infra: Infra) -> Iterator[Services]:
    svc = Services(infra)
    try:
        yield svc
    finally:
        svc.stop()
