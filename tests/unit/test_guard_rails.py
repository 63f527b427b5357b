"""The guard rails of ./scripts/test (scripts/check) fail on a violation: each tool runs with the project's
own configuration (pyproject.toml) on a copy with one violation put in on purpose."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.skipif(
    not all((BIN / tool).exists() for tool in ("ruff", "mypy", "lint-imports")),
    reason="ruff, mypy and import-linter come with the dev extra (./scripts/setup)",
)


def run(*argv: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_the_check_script_runs_the_three_tools() -> None:
    script = (ROOT / "scripts" / "check").read_text()
    assert "ruff\" check" in script and "mypy\" --config-file pyproject.toml" in script and "lint-imports" in script
    assert "./scripts/check" in (ROOT / "scripts" / "test").read_text()


def test_ruff_fails_on_an_unused_import_and_on_import_order(tmp_path: Path) -> None:
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / "bad.py").write_text("import sys\nimport os\n\nprint(os.sep)\n")
    out = run(str(BIN / "ruff"), "check", "--no-cache", "bad.py", cwd=tmp_path)
    assert out.returncode == 1
    assert "F401" in out.stdout and "I001" in out.stdout


def test_mypy_is_strict_on_core_and_checks_untyped_defs_elsewhere(tmp_path: Path) -> None:
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    package = tmp_path / "services" / "unimodel"
    for sub in ("core", "cache"):
        (package / sub).mkdir(parents=True)
        (package / sub / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    untyped = "def double(x):\n    return x * 2\n"
    (package / "core" / "untyped.py").write_text(untyped)
    (package / "cache" / "untyped.py").write_text(untyped)
    (package / "cache" / "wrong.py").write_text("def f():\n    n: int = 'one'\n    return n\n")
    core = run(str(BIN / "mypy"), "--config-file", "pyproject.toml", "--no-incremental", "services/unimodel/core/untyped.py", cwd=tmp_path)
    assert core.returncode == 1 and "no-untyped-def" in core.stdout, core.stdout
    cache = run(str(BIN / "mypy"), "--config-file", "pyproject.toml", "--no-incremental", "services/unimodel/cache/untyped.py", cwd=tmp_path)
    assert cache.returncode == 0, cache.stdout  # not strict outside core, batcher, router
    wrong = run(str(BIN / "mypy"), "--config-file", "pyproject.toml", "--no-incremental", "services/unimodel/cache/wrong.py", cwd=tmp_path)
    assert wrong.returncode == 1 and "Incompatible types in assignment" in wrong.stdout  # bodies of untyped defs are checked


def contracts(services: Path) -> subprocess.CompletedProcess[str]:
    return run(
        str(BIN / "lint-imports"), "--no-cache", "--no-logo", str(ROOT / "pyproject.toml"),
        cwd=services, env={"PYTHONPATH": str(services), "PATH": str(BIN)},
    )


@pytest.fixture
def services(tmp_path: Path) -> Path:
    """A copy of the package, without its generated code's caches."""
    shutil.copytree(ROOT / "services" / "unimodel", tmp_path / "unimodel", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_the_contracts_hold_on_the_code_as_it_is(services: Path) -> None:
    out = contracts(services)
    assert out.returncode == 0, out.stdout
    assert out.stdout.count("KEPT") == 4


def test_core_importing_a_service_breaks_a_contract(services: Path) -> None:
    kinds = services / "unimodel" / "core" / "kinds.py"
    kinds.write_text(kinds.read_text() + "\nfrom unimodel.gateway import catalog  # noqa: E402  (planted after the module's code)\n")
    out = contracts(services)
    assert out.returncode == 1
    assert "core imports no service package BROKEN" in out.stdout


def test_an_import_cycle_breaks_a_contract(services: Path) -> None:
    catalog = services / "unimodel" / "gateway" / "catalog.py"  # the service imports catalog: now catalog imports it back
    catalog.write_text(catalog.read_text() + "\nfrom unimodel.gateway import service  # noqa: E402  (planted after the module's code)\n")
    out = contracts(services)
    assert out.returncode == 1
    assert "no import cycles in services/ BROKEN" in out.stdout
    assert ".catalog -> .service" in out.stdout or ".service -> .catalog" in out.stdout
