"""gpu-worker settings: built-in models, model repository, models loaded at start (one-line errors)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_worker_onnx import identity_model

from unimodel.core.settings import SettingsError, load_settings
from unimodel.worker.settings import WorkerSettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("UNIMODEL_"):
            monkeypatch.delenv(key)


def test_defaults() -> None:
    s = load_settings(WorkerSettings, [])
    assert isinstance(s, WorkerSettings)
    assert s.model_list == ["echo"] and s.load_list == [] and s.model_repository == ""


def test_repository_and_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    identity_model(tmp_path)
    s = load_settings(WorkerSettings, ["--model-repository", str(tmp_path), "--load", "identity", "--models", ""])
    assert isinstance(s, WorkerSettings)
    assert s.load_list == ["identity"] and s.model_list == [] and s.model_repository == str(tmp_path.resolve())
    monkeypatch.setenv("UNIMODEL_MODEL_REPOSITORY", str(tmp_path))
    monkeypatch.setenv("UNIMODEL_LOAD", "identity")
    s = load_settings(WorkerSettings, [])
    assert isinstance(s, WorkerSettings) and s.load_list == ["identity"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--models", "echo,gpt"], r"invalid setting models \(--models / UNIMODEL_MODELS\): unknown built-in model 'gpt'"),
        (["--model-repository", "/nonexistent/repo"], "invalid setting model_repository .*is not a folder"),
        (["--load", "identity"], "invalid setting load .*needs --model-repository"),
        (["--model-repository", "{repo}", "--load", "missing"], "invalid setting load .*model 'missing': no config.yaml"),
        (["--model-repository", "{repo}", "--load", "echo"], "invalid setting load .*'echo' is also a built-in model"),
        (["--model-repository", "{repo}", "--load", "bad"], "invalid setting load .*model 'bad': .*engine: unknown engine 'tpu'"),
    ],
)
def test_bad_settings_are_one_line(tmp_path: Path, argv: list[str], message: str) -> None:
    identity_model(tmp_path)
    (tmp_path / "echo").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.yaml").write_text("engine: tpu\ninputs: []\n")
    with pytest.raises(SettingsError, match=message) as info:
        load_settings(WorkerSettings, [a.replace("{repo}", str(tmp_path)) for a in argv])
    assert "\n" not in str(info.value)


def test_bad_load_exits_2_with_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIMODEL_")}
    proc = subprocess.run(
        [sys.executable, "-m", "unimodel.worker", "--model-repository", str(tmp_path), "--load", "nope"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "invalid setting load" in lines[0] and "no config.yaml" in lines[0]
