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
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import yaml
from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    CliSettingsSource,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)
from pydantic_settings import SettingsError as LibrarySettingsError

from unimodel.core.transport_security import EtcdAuth, NatsAuth, TlsFiles

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

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
    # NATS and etcd credentials and TLS (docs/security.md): a secret is given as a value or, better, as a
    # file (a mounted Secret), read at each (re)connection; none set = no authentication.
    nats_user: str = Field(
        "", description="NATS user name (default with a password: the service's kind, as in its NATS permissions)"
    )
    nats_password: str = Field("", description="NATS password (prefer nats_password_file)")
    nats_password_file: LocalPath = Field("", description="file holding the NATS password")
    nats_token: str = Field("", description="NATS authentication token (prefer nats_token_file)")
    nats_token_file: LocalPath = Field("", description="file holding the NATS token")
    nats_nkey_seed_file: LocalPath = Field("", description="file holding this service's NATS nkey seed")
    nats_creds_file: LocalPath = Field("", description="NATS credentials file (user JWT and nkey seed)")
    nats_tls_ca_file: LocalPath = Field("", description="CA certificate (PEM) that signs the NATS server's; enables TLS")
    nats_tls_cert_file: LocalPath = Field("", description="client certificate (PEM) for NATS, with nats_tls_key_file")
    nats_tls_key_file: LocalPath = Field("", description="client key (PEM) for NATS")
    nats_tls_hostname: str = Field("", description="server name expected in the NATS certificate (default: the URL's host)")
    etcd_user: str = Field("", description="etcd user name (with etcd_password or etcd_password_file)")
    etcd_password: str = Field("", description="etcd password (prefer etcd_password_file)")
    etcd_password_file: LocalPath = Field("", description="file holding the etcd password")
    etcd_tls_ca_file: LocalPath = Field("", description="CA certificate (PEM) that signs etcd's; enables TLS")
    etcd_tls_cert_file: LocalPath = Field("", description="client certificate (PEM) for etcd, with etcd_tls_key_file")
    etcd_tls_key_file: LocalPath = Field("", description="client key (PEM) for etcd")
    lease_ttl_s: int = Field(10, ge=2, le=3600, description="etcd lease TTL of this instance's registration")
    grpc_port: int = Field(0, ge=0, le=65535, description="gRPC port (health, reflection, API); 0 = any free port")
    metrics_port: int = Field(-1, ge=-1, le=65535, description="Prometheus /metrics port; -1 = off, 0 = any")
    drain_timeout_s: float = Field(10.0, gt=0, le=3600, description="max time to finish in-flight work on stop")
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="default deadline of a request")
    max_inflight: int = Field(1024, ge=1, description="requests handled at once before answering busy")
    same_host_blobs: bool = Field(
        True,
        description="big items and answers (4 MiB+) are shared through a memory file that services on the same "
        "host and PID namespace map instead of fetching it in chunks over NATS (core/blobs.py); off: always NATS",
    )
    log_level: LogLevel = Field("info", description="log level")
    log_format: Literal["text", "json"] = Field("text", description="log line format")
    # Tracing: a value set here wins over the standard OTEL_* variables, which fill what is left unset
    # (telemetry.trace_setup; docs/operations.md "Traces").
    otel_exporter: Literal["none", "console", "otlp-grpc", "otlp-http"] | None = Field(
        None, description="span exporter (default: OTEL_TRACES_EXPORTER, else none)"
    )
    otel_endpoint: str = Field(
        "", description="OTLP endpoint (default: OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, else the exporter's own)"
    )
    otel_sample_ratio: float | None = Field(
        None, ge=0.0, le=1.0, description="fraction of new traces sampled (default: OTEL_TRACES_SAMPLER(_ARG), else 1.0)"
    )

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
    def _credentials(self) -> CommonSettings:
        pairs = [
            ("nats_password", "nats_password_file"), ("nats_token", "nats_token_file"),
            ("etcd_password", "etcd_password_file"),
        ]
        for value, file in pairs:
            if getattr(self, value) and getattr(self, file):
                raise ValueError(f"{value} and {file} are both set; give one")
        if (self.nats_password or self.nats_password_file) and not self.nats_user and self.service != "service":
            self.nats_user = self.service  # one user per service kind (subjects.PERMISSIONS)
        for user, secret in (("nats_user", "nats_password"), ("etcd_user", "etcd_password")):
            has_secret = getattr(self, secret) or getattr(self, secret + "_file")
            if has_secret and not getattr(self, user):
                raise ValueError(f"{secret} needs {user}")
            if getattr(self, user) and not has_secret:
                raise ValueError(f"{user} needs {secret} or {secret}_file")
        for prefix in ("nats", "etcd"):
            cert, key = getattr(self, f"{prefix}_tls_cert_file"), getattr(self, f"{prefix}_tls_key_file")
            if bool(cert) != bool(key):
                raise ValueError(f"{prefix}_tls_cert_file and {prefix}_tls_key_file go together")
        return self

    def nats_auth(self) -> NatsAuth:
        """This service's NATS credentials and TLS (bus.Bus)."""
        tls = TlsFiles(self.nats_tls_ca_file, self.nats_tls_cert_file, self.nats_tls_key_file)
        return NatsAuth(
            self.nats_user, self.nats_password, self.nats_password_file, self.nats_token, self.nats_token_file,
            self.nats_nkey_seed_file, self.nats_creds_file, tls, self.nats_tls_hostname,
        )

    def etcd_auth(self) -> EtcdAuth:
        """This service's etcd credentials and TLS (store.EtcdStore)."""
        tls = TlsFiles(self.etcd_tls_ca_file, self.etcd_tls_cert_file, self.etcd_tls_key_file)
        return EtcdAuth(self.etcd_user, self.etcd_password, self.etcd_password_file, tls)

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
        # Built directly (tests, `unimodel status`): keyword arguments over UNIMODEL_* env. A service's
        # settings come from load_settings, which lists its own sources (CLI flags, env, YAML file).
        return (init_settings, env_settings)


_SERVICE_CLASSES: dict[str, type[CommonSettings]] = {}


class BatchSenderSettings(CommonSettings):
    """Options of the services that send batches to workers (core/dispatch.py): the batchers, and a router for
    a batcher that has no routing table yet. One set of options for both."""

    retries: int = Field(1, ge=0, le=5, description="times a batch is sent to another instance when one is lost")
    try_timeout_s: float = Field(30.0, gt=0, le=3600, description="max wait for one worker's reply")
    suspend_s: float = Field(
        2.0, ge=0, le=600, description="how long an instance that did not answer gets no traffic (unless no other)"
    )


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


class ServiceYamlSource(YamlConfigSettingsSource):
    """The YAML file's values for one service: its shared top-level keys, overlaid by the service's section.

    One file serves every service, so another service's section, and top-level keys that only other
    services have, are valid and skipped; any other key is an error naming it."""

    def __init__(self, settings_cls: type[CommonSettings], yaml_file: str) -> None:
        self._service_cls = settings_cls  # read by _read_file, which the base class calls on init
        self._shown = yaml_file  # the path as given, for messages
        path = Path(yaml_file).expanduser()
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise SettingsError(f"config file {yaml_file!r} {what}")
        super().__init__(settings_cls, yaml_file=path)

    def _read_file(self, file_path: Path | Traversable) -> dict[str, Any]:
        try:
            raw = super()._read_file(file_path)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise SettingsError(f"config file {self._shown!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise SettingsError(f"config file {self._shown!r} must hold a mapping")
        return self._service_values(raw)

    def _service_values(self, raw: dict[str, Any]) -> dict[str, Any]:
        service, fields = self._service_cls.service, self._service_cls.model_fields
        services = all_service_settings()
        known_fields = set().union(*(c.model_fields for c in services.values())) | set(fields)
        data: dict[str, Any] = {}
        for key, value in raw.items():
            if key in services or key == service:
                continue
            if key not in known_fields:
                raise SettingsError(f"config file {self._shown!r}: unknown setting {key!r}")
            if key in fields:
                data[key] = value
        section = raw.get(service) or {}
        if not isinstance(section, dict):
            raise SettingsError(f"config file {self._shown!r}: section {service!r} must be a mapping")
        for key, value in section.items():
            if key not in fields:
                raise SettingsError(f"config file {self._shown!r}: unknown setting {service}.{key}")
            data[key] = value
        return data


_NONE_ARG = "\0"
"""The flag value that would mean None (pydantic-settings' default is "null"): argv cannot hold NUL, so no
flag value does, and "null" is a string like any other."""


def _add_argument(parser: argparse.ArgumentParser, *names: str, **kwargs: Any) -> argparse.Action:
    """``add_argument`` without the help's "(default: ...)" of an empty or None default: the description
    says what unset means (e.g. "default: host")."""
    if isinstance(kwargs.get("help"), str):
        kwargs["help"] = kwargs["help"].replace(" (default: )", "").replace(f" (default: {_NONE_ARG})", "")
    return parser.add_argument(*names, **kwargs)


def _cli_source(cls: type[CommonSettings], prog: str) -> CliSettingsSource[argparse.ArgumentParser]:
    """Every field of ``cls`` as a flag ``--foo-bar`` (help: description, default, env var), on a parser
    that also takes ``--config``."""
    parser = argparse.ArgumentParser(prog=prog, description=f"Run the UniModel {cls.service} service.")
    parser.add_argument("--config", metavar="FILE", help=f"YAML settings file [env: {ENV_PREFIX}CONFIG]")
    return CliSettingsSource(
        cls,
        root_parser=parser,
        add_argument_method=_add_argument,
        cli_kebab_case=True,
        cli_show_env_vars=True,
        cli_parse_none_str=_NONE_ARG,
        cli_hide_none_type=True,
    )


def load_settings(
    cls: type[CommonSettings], argv: Sequence[str] | None = None, *, prog: str | None = None
) -> CommonSettings:
    """Parse CLI flags, env and the YAML file into ``cls``; raise SettingsError on any bad value.

    The sources, highest first: CLI flags, ``UNIMODEL_*`` env, the YAML file (``--config`` /
    ``UNIMODEL_CONFIG``); then the defaults. A bad flag (unknown, or missing its value) exits 2 with
    argparse's usage and message.
    """
    cli = _cli_source(cls, prog or f"unimodel {cls.service}")
    args = cli.root_parser.parse_args(list(argv) if argv is not None else None)
    config_path = args.config or os.environ.get(ENV_PREFIX + "CONFIG")
    try:
        sources: tuple[PydanticBaseSettingsSource, ...] = (cli(parsed_args=args), EnvSettingsSource(cls))
        if config_path:
            sources += (ServiceYamlSource(cls, config_path),)
        # The file to read is known only once the flags are parsed, so this call lists its sources
        # itself (BaseSettings' `_build_sources`) instead of the class holding them between calls.
        return cls(_build_sources=(sources, {}))
    except ValidationError as exc:
        err = exc.errors()[0]
        if not err["loc"]:  # a rule over several fields (e.g. _credentials): its message names them
            raise SettingsError(f"invalid settings: {err['msg'].removeprefix('Value error, ')}") from None
        field = str(err["loc"][0])
        where = f"{flag_name(field)} / {env_name(field)}" if field in cls.model_fields else field
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        msg = err["msg"].removeprefix("Value error, ")
        raise SettingsError(f"invalid setting {field} ({where}): {msg}{shown}") from None
    except LibrarySettingsError as exc:  # a value pydantic-settings could not decode, e.g. bad JSON for a dict
        message, cause = str(exc), str(exc.__cause__ or "")
        message += f": {cause}" if cause and cause not in message else ""
        raise SettingsError(f"invalid setting: {message.splitlines()[0]}") from None
