"""Model registration requests -> a validated ModelConfig. Plain logic, no transport.

A model is registered by name from the configured model repository, or by a path inside the configured
models root (anything that resolves outside it, symlinks included, is refused with 403). The folder's
config.yaml may be overridden field by field with a "config" object in the request.

The result is safe by construction (core/modelconfig.py): every file it names resolves inside the model
folder (403 otherwise), every number is within its range (400), and an `openai`-engine model names only an
upstream URL and API-key variable that the gateway's settings allow (403).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import json_format

from unimodel.core import errors, modelconfig
from unimodel.v1 import model_pb2

FIELDS = frozenset({"name", "path", "config"})


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve(
    body: Any, repository: str, models_root: str, upstreams: modelconfig.UpstreamPolicy | None = None
) -> model_pb2.ModelConfig:
    """The config a registration request asks for, validated. `upstreams`: what an openai-engine model may
    name (default: nothing, so such a model is refused)."""
    if not isinstance(body, dict):
        raise errors.InvalidArgument('the body must be a JSON object like {"name": "mlp"} or {"path": "..."}')
    unknown = set(body) - FIELDS
    if unknown:
        raise errors.InvalidArgument(f"unknown field(s): {', '.join(sorted(unknown))}", field=sorted(unknown)[0])
    name, path, overrides = body.get("name"), body.get("path"), body.get("config") or {}
    if name is not None and not isinstance(name, str):
        raise errors.InvalidArgument("name must be a string", field="name")
    if path is not None and not isinstance(path, str):
        raise errors.InvalidArgument("path must be a string", field="path")
    if not isinstance(overrides, dict):
        raise errors.InvalidArgument("config must be an object of ModelConfig fields", field="config")
    for field, value in (("name", name), ("path", path)):
        if value and "\x00" in value:  # no file name holds one (os.path raises ValueError on it)
            raise errors.InvalidArgument(f"{field} must not contain a NUL character", field=field)
    if not name and not path:
        raise errors.InvalidArgument("name or path is required", field="name")
    if path:
        root_setting = models_root or repository
        if not root_setting:
            raise errors.PermissionDenied("registering a model by path needs the gateway's --models-root")
        root = Path(root_setting).resolve()
        folder = (root / path).resolve()  # an absolute path replaces root
        if not _inside(folder, root):
            raise errors.PermissionDenied(f"path {path!r} is outside the models root", field="path")
    else:
        if not repository:
            raise errors.FailedPrecondition("the gateway has no --model-repository to register models from by name")
        repo = Path(repository).resolve()
        folder = (repo / str(name)).resolve()
        if folder.parent != repo:
            raise errors.InvalidArgument(f"invalid model name {name!r}", field="name")
    if not folder.is_dir():
        raise errors.NotFound(f"no model folder at {path or name!r}", field="path" if path else "name")
    config = modelconfig.load(folder)
    if name:
        config.name = name
    if overrides:
        patch = model_pb2.ModelConfig()
        try:
            json_format.ParseDict(overrides, patch)
        except json_format.ParseError as exc:
            raise errors.InvalidArgument(f"config: {exc}", field="config") from None
        for fd, _ in patch.ListFields():
            if fd.name in ("path",):
                raise errors.InvalidArgument("config.path cannot be set; use path", field="config.path")
            config.ClearField(fd.name)
        config.MergeFrom(patch)
    modelconfig.apply_defaults(config)
    modelconfig.validate(config, source=f"model {config.name!r}")
    modelconfig.check_files(config)
    modelconfig.check_upstream(config, upstreams or modelconfig.UpstreamPolicy())
    return config


def upstream_policy(urls: list[str], key_envs: list[str]) -> modelconfig.UpstreamPolicy:
    """The gateway's settings upstream_urls / upstream_key_envs as a policy."""
    return modelconfig.UpstreamPolicy(tuple(urls), tuple(key_envs), where="the gateway")


def repository_models(repository: str, which: str) -> list[Path]:
    """Model folders of the repository named by `which` ('all' or comma separated names)."""
    if not repository or not which.strip():
        return []
    repo = Path(repository)
    if which.strip() == "all":
        if not repo.is_dir():
            return []
        return sorted(p for p in repo.iterdir() if not p.name.startswith(".") and (p / modelconfig.CONFIG_FILE).is_file())
    return [repo / n.strip() for n in which.split(",") if n.strip()]
