from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from unimodel.batcher.settings import BatcherSettings
from unimodel.core.settings import SettingsError, load_settings
from unimodel.gateway.settings import GatewaySettings
from unimodel.router.settings import RouterSettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("UNIMODEL_"):
            monkeypatch.delenv(key)


def test_defaults_follow_triton() -> None:
    s = load_settings(GatewaySettings, [])
    assert (s.http_port, s.grpc_port) == (8000, 8001)
    assert s.lease_ttl_s == 10
    assert s.instance_id.startswith("gateway-")


def test_precedence_cli_over_env_over_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "um.yaml"
    cfg.write_text("lease_ttl_s: 20\ndrain_timeout_s: 3\ngateway:\n  http_port: 9000\n  max_body_bytes: 4096\n")
    s = load_settings(GatewaySettings, ["--config", str(cfg)])
    assert (s.lease_ttl_s, s.http_port, s.max_body_bytes, s.drain_timeout_s) == (20, 9000, 4096, 3.0)
    monkeypatch.setenv("UNIMODEL_HTTP_PORT", "9100")
    s = load_settings(GatewaySettings, ["--config", str(cfg)])
    assert s.http_port == 9100
    s = load_settings(GatewaySettings, ["--config", str(cfg), "--http-port", "9200"])
    assert s.http_port == 9200


def test_yaml_from_env_and_other_sections_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "um.yaml"
    cfg.write_text("http_port: 9000\nbatcher:\n  max_batch_size: 8\nrouter:\n  retries: 2\n")
    monkeypatch.setenv("UNIMODEL_CONFIG", str(cfg))
    assert load_settings(BatcherSettings, []).max_batch_size == 8
    assert load_settings(RouterSettings, []).retries == 2


@pytest.mark.parametrize(
    ("argv", "yaml_text", "expected"),
    [
        (["--http-port", "70000"], None, "invalid setting http_port (--http-port / UNIMODEL_HTTP_PORT)"),
        (["--lease-ttl-s", "abc"], None, "invalid setting lease_ttl_s"),
        (["--nats-url", "http://x"], None, "is not a nats:// URL"),
        (["--etcd-endpoints", "nohost"], None, "is not host:port"),
        (["--log-level", "loud"], None, "invalid setting log_level"),
        ([], "gateway:\n  no_such: 1\n", "unknown setting gateway.no_such"),
        ([], "bogus: 1\n", "unknown setting 'bogus'"),
        ([], "a: [\n", "is not valid YAML"),
    ],
)
def test_bad_values_give_one_line(argv: list[str], yaml_text: str | None, expected: str, tmp_path: Path) -> None:
    if yaml_text is not None:
        cfg = tmp_path / "bad.yaml"
        cfg.write_text(yaml_text)
        argv = [*argv, "--config", str(cfg)]
    with pytest.raises(SettingsError) as info:
        load_settings(GatewaySettings, argv)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_missing_config_file() -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(GatewaySettings, ["--config", "/nonexistent/um.yaml"])


@pytest.mark.parametrize("module", ["unimodel.gateway", "unimodel.router", "unimodel.worker"])
def test_bad_setting_exits_2_without_traceback(module: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", module, "--lease-ttl-s", "0"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "invalid setting lease_ttl_s" in lines[0]


def test_cli_dispatch_and_unknown_command() -> None:
    proc = subprocess.run([sys.executable, "-m", "unimodel.cli", "frobnicate"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown command 'frobnicate'" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "unimodel.cli", "gpu-worker", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "UNIMODEL_MAX_CONCURRENT_BATCHES" in proc.stdout


def test_one_config_file_serves_every_service_in_a_process_that_runs_only_one(tmp_path: Path) -> None:
    """The README's YAML (shared keys, then a section per service) passed to `unimodel up --config` reaches
    every service: a router process, which imports no other service's settings, accepts the gateway's
    section and keys instead of stopping with "unknown setting 'gateway'"."""
    config = tmp_path / "unimodel.yaml"
    config.write_text("lease_ttl_s: 7\nhttp_port: 9000\ngateway:\n  max_body_bytes: 2048\nbatcher:\n  max_batch_size: 4\n")
    code = (
        "from unimodel.core.settings import load_settings\n"
        "from unimodel.router.settings import RouterSettings\n"
        f"s = load_settings(RouterSettings, ['--config', {str(config)!r}])\n"
        "print(s.lease_ttl_s)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "7"


def test_help_lists_every_flag_with_its_env_var_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        load_settings(GatewaySettings, ["--help"], prog="unimodel gateway")
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert out.startswith("usage: unimodel gateway")
    assert "--config FILE YAML settings file [env: UNIMODEL_CONFIG]" in out
    for name in GatewaySettings.model_fields:
        assert f"--{name.replace('_', '-')} " in out and f"[env: UNIMODEL_{name.upper()}]" in out
    assert "(default: 8000) [env: UNIMODEL_HTTP_PORT]" in out
    assert "(default: )" not in out and "\0" not in out  # empty and None defaults are left out


def test_bad_flag_exits_2_with_argparse_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        load_settings(GatewaySettings, ["--no-such-flag", "1"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("unrecognized arguments: --no-such-flag 1")


def test_flag_values_are_read_as_env_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """A flag takes what its variable takes (a JSON object for a map); "null" is a string like any other."""
    s = load_settings(GatewaySettings, ["--api-keys", '{"sk-a": "team-a"}', "--load-models", "null"])
    assert s.api_keys == {"sk-a": "team-a"} and s.load_models == "null"
    monkeypatch.setenv("UNIMODEL_API_KEYS", "not json")
    with pytest.raises(SettingsError, match=r'^invalid setting: error parsing value for field "api_keys"'):
        load_settings(GatewaySettings, [])


def test_a_yaml_file_is_read_by_its_own_call_only(tmp_path: Path) -> None:
    cfg = tmp_path / "um.yaml"
    cfg.write_text("lease_ttl_s: 20\ngateway:\n  http_port: 9000\n")
    assert load_settings(GatewaySettings, ["--config", str(cfg)]).http_port == 9000
    assert load_settings(GatewaySettings, []).http_port == 8000
    assert GatewaySettings().lease_ttl_s == 10  # built directly: keyword arguments and env only


def test_config_that_is_a_folder(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="is not a file"):
        load_settings(GatewaySettings, ["--config", str(tmp_path)])
