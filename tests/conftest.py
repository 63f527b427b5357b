from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests under tests/integration and tests/e2e carry their marker without repeating it."""
    for item in items:
        parts = Path(str(item.fspath)).relative_to(HERE).parts
        if parts[0] in ("integration", "e2e"):
            item.add_marker(getattr(pytest.mark, parts[0]))


@pytest.fixture(scope="session")
def model_repository() -> Path:
    """The prepared test model repository (<repo>/.cache/test-models; built once per clone)."""
    from modelrepo import prepared_repository

    return prepared_repository()
