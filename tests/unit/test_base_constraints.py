"""deploy/base_constraints.py: deploy/Dockerfile.cuda keeps UniModel's pins only for what vLLM's image lacks."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from helpers.deploy_checks import ROOT

SCRIPT = ROOT / "deploy" / "base_constraints.py"
spec = importlib.util.spec_from_file_location("base_constraints", SCRIPT)
assert spec and spec.loader
base_constraints = importlib.util.module_from_spec(spec)
spec.loader.exec_module(base_constraints)


def test_pins_of_installed_distributions_are_dropped_by_normalized_name() -> None:
    lines = ["# comment\n", "\n", "Torch==2.13.0+cpu\n", "numpy==2.3.0\n", "llama_cpp_python==0.3.36\n",
             "uvicorn[standard]==0.40\n", "grpcio>=1.81 ; python_version>'3'\n"]
    kept = base_constraints.missing_pins(lines, have={"torch", "numpy", "grpcio"})
    assert kept == ["llama_cpp_python==0.3.36", "uvicorn[standard]==0.40"]


def test_the_script_prints_what_this_python_lacks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("pytest==0.0.1\nno-such-distribution-here==1.0\n")
    out = subprocess.run([sys.executable, str(SCRIPT), str(constraints)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["no-such-distribution-here==1.0"]
