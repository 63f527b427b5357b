"""The vllm engine's tests (test_vllm_engine.py) run in .venv-vllm, the venv scripts/setup makes for vLLM's
CPU build, against the test repository's smollm2-135m-instruct-vllm: vllm cannot be imported here."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from unimodel.models.smollm2 import NAME_VLLM

REPO_ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(sys.prefix).parent / ".venv-vllm" / "bin" / "python"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm runs here: test_vllm_engine.py runs as it is"),
    pytest.mark.skipif(not VLLM_PYTHON.is_file(), reason=".venv-vllm is missing (scripts/setup makes it on x86-64 Linux)"),
]


@pytest.mark.timeout(900)
def test_the_vllm_engine_tests_pass_in_the_vllm_venv(model_repository: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UNIMODEL_", "PYTEST_"))}
    env["UNIMODEL_VLLM_MODEL"] = str(model_repository / NAME_VLLM)
    proc = subprocess.run(
        [str(VLLM_PYTHON), "-m", "pytest", "tests/integration/test_vllm_engine.py", "-q", "-p", "no:cacheprovider", "-rs"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=840,
    )
    lines = [line for line in proc.stdout.splitlines() if not line.startswith("(")]  # vLLM's process logs
    sys.stderr.write("\n".join(lines[-40:]) + "\n")
    summary = lines[-1] if lines else ""
    assert proc.returncode == 0, summary
    assert re.search(r"\b\d+ passed\b", summary) and "skipped" not in summary, summary
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
