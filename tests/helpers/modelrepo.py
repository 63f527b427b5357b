"""The test model repository: every catalog model prepared once per clone into <repo>/.cache/test-models.

`prepared_repository()` runs `python -m unimodel.models prepare` (a subprocess: torch stays out of the
test process) only when some model is not prepared yet, so the export cost is paid once per clone; later
sessions find every stamp and return at once. Concurrent sessions are safe: prepare holds a lock on the
repository and the second one finds the models prepared.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from unimodel.models import CATALOG, is_prepared

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE = REPO_ROOT / ".cache" / "test-models"
PREPARE_TIMEOUT_S = 900


def prepare_command(repository: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "unimodel.models", "prepare", "--repository", str(repository), *args]


def prepared_repository() -> Path:
    """Path of a repository holding every catalog model, prepared (built on first use)."""
    if all(is_prepared(CACHE, spec) for spec in CATALOG.values()):
        return CACHE
    proc = subprocess.run(  # every catalog model, the opt-in ones (the vllm engine's) too
        prepare_command(CACHE, "--only", ",".join(CATALOG)), capture_output=True, text=True, timeout=PREPARE_TIMEOUT_S, cwd=REPO_ROOT
    )
    sys.stderr.write(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"`unimodel models prepare` failed (rc {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    missing = [spec.name for spec in CATALOG.values() if not is_prepared(CACHE, spec)]
    if missing:
        raise RuntimeError(f"`unimodel models prepare` left models unprepared: {', '.join(missing)}\n{proc.stdout}")
    return CACHE
