"""The run-time dependencies are exactly what the code imports: every third-party module imported under
services/ comes from a distribution pyproject.toml declares (in [project].dependencies, or an extra for
what only that extra's code imports), and every declared run-time dependency is imported."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "services" / "unimodel"
# Declared but never imported by name, each for a reason
INDIRECT = {
    "setuptools": "milvus-lite imports pkg_resources, which setuptools 82 removed",
    "python-multipart": "Starlette's Request.form() imports it (multipart uploads: gateway/openai/audio.py)",
}
# Imported, but installed elsewhere: vLLM lives in its own venv (requirements/vllm.txt, scripts/setup)
ELSEWHERE = {"vllm": ROOT / "requirements" / "vllm.txt"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=\[ ;!~]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def imported_modules() -> dict[str, set[str]]:
    """Top-level modules imported by the package (generated code excluded) -> the files importing them."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if PACKAGE / "v1" in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("unimodel", "__future__"):
                    found.setdefault(top, set()).add(str(path.relative_to(PACKAGE)))
    return found


def test_every_imported_module_is_declared_and_every_declared_dependency_imported() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_name(r) for r in project["dependencies"]}
    extras = {_name(r) for extra in ("models", "llm", "audio") for r in project["optional-dependencies"][extra]}
    owners = importlib.metadata.packages_distributions()
    used: set[str] = set()
    undeclared = []
    for module, files in sorted(imported_modules().items()):
        if module in ELSEWHERE:
            assert module in ELSEWHERE[module].read_text(), f"{module} is not in {ELSEWHERE[module]}"
            continue
        dists = {_name(d) for d in owners.get(module, [])}
        assert dists, f"no installed distribution provides {module!r} (imported by {sorted(files)})"
        used |= dists
        if not dists & (runtime | extras):
            undeclared.append(f"{module} ({', '.join(sorted(dists))}) imported by {sorted(files)[:3]}")
    assert not undeclared, "imported but not declared in pyproject.toml: " + "; ".join(undeclared)
    unused = runtime - used - set(INDIRECT)
    assert not unused, f"declared run-time dependencies nothing imports: {sorted(unused)}"
