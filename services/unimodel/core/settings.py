"""Typed settings for every service: defaults < YAML file < UNIMODEL_* env < CLI flags.

Each field ``foo_bar`` is the flag ``--foo-bar`` and the env var ``UNIMODEL_FOO_BAR``. A YAML file
(``--config`` / ``UNIMODEL_CONFIG``) holds shared keys at the top level and per-service keys in a
section named after the service (``gateway:``, ``router:``, ...). Nothing is read at import time.
A bad value raises :class:`SettingsError` with one line naming the field.
"""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "UNIMODEL_"
LogLevel = Literal["debug", "info", "warning", "error"]


def absolute_path(value: str) -> str:
    """A local path made absolute against the working directory the service started in (empty stays
    empty), so a child process or a library that changes directory sees the same file."""
    return str(Path(value).expanduser().resolve()) if value else value


LocalPath = Annotated[str, AfterValidator(absolute_path)]
"""A file or folder setting: resolved to an absolute path once, when the settings are read."""


class SettingsError(Exception):
    """A setting is invalid; the message is one line naming the field."""


class CommonSettings(BaseSettings):
    """Options every service shares."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", case_sensitive=False)

    service: ClassVar[str] = "service"

    instance_id: str = Field("", description="instance id in etcd and NATS (default: <service>-<random>)")
    host: str = Field("127.0.0.1", description="address the service's servers bind to")
    advertise_host: str = Field("", description="address other services use to reach this one (default: host)")
    nats_url: str = Field("nats://127.0.0.1:4222", description="NATS server URL(s), comma separated")
    etcd_endpoints: str = Field("127.0.0.1:2379", description="etcd endpoint(s) host:port, comma separated")
    etcd_prefix: str = Field("/unimodel/v1", description="etcd key prefix for all UniModel keys")
    lease_ttl_s: int = Field(10, ge=2, le=3600, description="etcd lease TTL of this instance's registration")
    grpc_port: int = Field(0, ge=0, le=65535, description="gRPC port (health, reflection, API); 0 = any free port")
    metrics_port: int = Field(-1, ge=-1, le=65535, description="Prometheus /metrics port; -1 = off, 0 = any")
    drain_timeout_s: float = Field(10.0, gt=0, le=3600, description="max time to finish in-flight work on stop")
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="default deadline of a request")
    max_inflight: int = Field(1024, ge=1, description="requests handled at once before answering busy")
    log_level: LogLevel = Field("info", description="log level")
    log_format: Literal["text", "json"] = Field("text", description="log line format")
    otel_exporter: Literal["none", "console", "otlp-grpc", "otlp-http"] = Field(
        "none", description="OpenTelemetry span exporter"
    )
    otel_endpoint: str = Field("", description="OTLP endpoint (default: the exporter's own)")
    otel_sample_ratio: float = Field(1.0, ge=0.0, le=1.0, description="fraction of new traces sampled")

    @field_validator("instance_id")
    @classmethod
    def _id_is_token(cls, v: str) -> str:
        if v and not all(c.isalnum() or c in "-_" for c in v):
            raise ValueError("use letters, digits, '-' and '_' only")
        return v

    @field_validator("nats_url")
    @classmethod
    def _nats_urls(cls, v: str) -> str:
        for url in cls._split(v):
            if not url.startswith(("nats://", "tls://", "ws://", "wss://")):
                raise ValueError(f"{url!r} is not a nats:// URL")
        if not cls._split(v):
            raise ValueError("at least one URL is needed")
        return v

    @field_validator("etcd_endpoints")
    @classmethod
    def _etcd_endpoints(cls, v: str) -> str:
        eps = cls._split(v)
        if not eps:
            raise ValueError("at least one endpoint is needed")
        for ep in eps:
            host, _, port = ep.removeprefix("http://").rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{ep!r} is not host:port")
        return v

    @field_validator("etcd_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/") or v.endswith("/") or len(v) < 2:
            raise ValueError("must start with '/' and not end with '/'")
        return v

    @model_validator(mode="after")
    def _fill_defaults(self) -> CommonSettings:
        if not self.instance_id:
            self.instance_id = f"{self.service}-{uuid.uuid4().hex[:8]}"
        if not self.advertise_host:
            self.advertise_host = socket.gethostname() if self.host in ("0.0.0.0", "::") else self.host
        return self

    @staticmethod
    def _split(v: str) -> list[str]:
        return [p.strip() for p in v.split(",") if p.strip()]

    @property
    def nats_servers(self) -> list[str]:
        return self._split(self.nats_url)

    @property
    def etcd_endpoint_list(self) -> list[tuple[str, int]]:
        out = []
        for ep in self._split(self.etcd_endpoints):
            host, _, port = ep.removeprefix("http://").rpartition(":")
            out.append((host, int(port)))
        return out

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # CLI flags arrive as init kwargs; YAML values as the _yaml kwarg handled by _YamlSource.
        return (init_settings, env_settings, _YamlSource(settings_cls))


class _YamlSource(PydanticBaseSettingsSource):
    """Lowest-priority source: values from the YAML file, set by :func:`load_settings`."""

    data: ClassVar[dict[str, Any]] = {}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self.data.items() if k in self.settings_cls.model_fields}


_SERVICE_CLASSES: dict[str, type[CommonSettings]] = {}


def register_settings(cls: type[CommonSettings]) -> type[CommonSettings]:
    """Class decorator: makes a service's settings known to YAML validation and the CLI."""
    _SERVICE_CLASSES[cls.service] = cls
    return cls


_SETTINGS_MODULES = tuple(f"unimodel.{pkg}.settings" for pkg in ("gateway", "router", "batcher", "cache", "embedder", "worker"))
"""Where each service's settings class is defined (imported on demand: a process runs one service)."""


def all_service_settings() -> dict[str, type[CommonSettings]]:
    """Every service's settings class, by service name, importing the modules this process has not."""
    for module in _SETTINGS_MODULES:
        importlib.import_module(module)
    return dict(_SERVICE_CLASSES)


def registered_settings() -> dict[str, type[CommonSettings]]:
    """Settings classes by service name (those imported so far)."""
    return dict(_SERVICE_CLASSES)


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def build_parser(cls: type[CommonSettings], prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=f"Run the UniModel {cls.service} service.")
    parser.add_argument("--config", metavar="FILE", help=f"YAML settings file (env {ENV_PREFIX}CONFIG)")
    for name, field in cls.model_fields.items():
        default = "" if field.default in ("", None) else f" (default: {field.default})"
        parser.add_argument(
            flag_name(name),
            dest=name,
            metavar=name.upper(),
            default=None,
            help=f"{field.description or name}{default}; env {env_name(name)}",
        )
    return parser


def _read_yaml(path: str, service: str, cls: type[CommonSettings]) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise SettingsError(f"config file {path!r} does not exist") from None
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(f"config file {path!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise SettingsError(f"config file {path!r} must hold a mapping")
    services = all_service_settings()  # one file serves every service: the others' sections and keys are valid here
    known_fields = set().union(*(c.model_fields for c in services.values())) | set(cls.model_fields)
    data: dict[str, Any] = {}
    for key, value in raw.items():
        if key in services or key == service:
            continue
        if key not in known_fields:
            raise SettingsError(f"config file {path!r}: unknown setting {key!r}")
        if key in cls.model_fields:
            data[key] = value
    section = raw.get(service) or {}
    if not isinstance(section, dict):
        raise SettingsError(f"config file {path!r}: section {service!r} must be a mapping")
    for key, value in section.items():
        if key not in cls.model_fields:
            raise SettingsError(f"config file {path!r}: unknown setting {service}.{key}")
        data[key] = value
    return data


def load_settings(
    cls: type[CommonSettings], argv: Sequence[str] | None = None, *, prog: str | None = None
) -> CommonSettings:
    """Parse CLI flags, env and the YAML file into ``cls``; raise SettingsError on any bad value."""
    parser = build_parser(cls, prog or f"unimodel {cls.service}")
    args = parser.parse_args(list(argv) if argv is not None else None)
    cli = {k: v for k, v in vars(args).items() if v is not None and k != "config"}
    config_path = args.config or os.environ.get(ENV_PREFIX + "CONFIG")
    _YamlSource.data = _read_yaml(config_path, cls.service, cls) if config_path else {}
    try:
        return cls(**cli)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        where = f"{flag_name(field)} / {env_name(field)}" if field in cls.model_fields else field
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        msg = err["msg"].removeprefix("Value error, ")
        raise SettingsError(f"invalid setting {field} ({where}): {msg}{shown}") from None
    finally:
        _YamlSource.data = {}
