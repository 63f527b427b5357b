"""compose/ and deploy/ use only commands the CLI has and env vars the settings define."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

from unimodel.cli import COMMANDS
from unimodel.core.settings import CommonSettings, env_name, registered_settings
from unimodel.local.cluster import SERVICES

ROOT = Path(__file__).resolve().parents[2]


def settings_class(command: str) -> type[CommonSettings]:
    importlib.import_module(COMMANDS[command])  # registers the service's settings
    return registered_settings()[command]


def test_compose_commands_and_env_exist() -> None:
    compose = yaml.safe_load((ROOT / "compose" / "docker-compose.yml").read_text())
    services = compose["services"]
    ours = {name: svc for name, svc in services.items() if "command" in svc and svc["command"][0] in COMMANDS}
    assert sorted(ours) == sorted(name for name, _module in SERVICES)
    for name, svc in ours.items():
        command = svc["command"][0]
        assert command == name
        fields = {env_name(f) for f in settings_class(command).model_fields}
        for var in svc["environment"]:
            assert var in fields, f"{name}: {var} is not a setting of {command}"


def test_dockerfile_entrypoint_is_the_cli() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["unimodel"]' in text
    assert "USER unimodel" in text
