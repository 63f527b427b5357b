"""A small Kustomize renderer for the manifests under deploy/k8s/ (there is no kustomize binary here).

It renders a kustomization directory the way `kubectl kustomize` does for the features the files use,
and refuses everything else, so a kustomization that needs the real tool fails the tests instead of
rendering wrong. Supported:

- ``apiVersion: kustomize.config.k8s.io/v1beta1`` and ``kind: Kustomization`` (or neither);
- ``resources``: YAML files (several documents each) and directories holding a kustomization.yaml,
  rendered recursively; two objects with the same kind, namespace and name are an error;
- ``patches``: each with ``path`` or inline ``patch``, and an optional ``target`` of ``kind``, ``name``,
  ``group``, ``version``, ``namespace`` (exact matches, no regular expressions), holding either
  - a JSON 6902 patch (a YAML/JSON list of operations ``add``, ``remove``, ``replace``, ``test``;
    ``target`` required), or
  - strategic-merge patches (mappings; without ``target`` each document applies to the object of its own
    kind, name and namespace; a ``target`` is refused on an entry of several documents, as Kustomize does).
    Maps merge key by key, ``null`` deletes a key, lists of the Kubernetes fields below merge by their
    ``patchMergeKey``, every other list is replaced. ``$patch`` and the other ``$`` directives are refused;
  a patch that selects no object is an error;
- ``images``: ``name`` with ``newName``, ``newTag`` and/or ``digest``, applied to the ``image`` of every
  container and init container of the rendered objects whose image name equals ``name``.

Any other kustomization key (``namespace``, ``namePrefix``, ``configMapGenerator``, ``components``, the
deprecated ``patchesStrategicMerge`` / ``patchesJson6902``, ...) raises :class:`UnsupportedKustomization`.
Kustomize applies patches before images within one kustomization, and a parent's transformations after
its resources' own; so does this.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILE = "kustomization.yaml"
SUPPORTED_KEYS = frozenset({"apiVersion", "kind", "resources", "patches", "images"})
PATCH_KEYS = frozenset({"path", "patch", "target"})
TARGET_KEYS = frozenset({"kind", "name", "group", "version", "namespace"})
IMAGE_KEYS = frozenset({"name", "newName", "newTag", "digest"})
JSON6902_OPS = frozenset({"add", "remove", "replace", "test"})

# patchMergeKey of the Kubernetes list fields these manifests may patch (k8s.io/api types.go).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey",
    "resourceClaims": "name",
}

Obj = dict[str, Any]


class UnsupportedKustomization(ValueError):
    """The kustomization uses something this renderer does not implement (or is invalid)."""


class PatchError(ValueError):
    """A patch cannot be applied (no matching object, missing path, failed test)."""


def render(directory: Path | str) -> list[Obj]:
    """The objects `kustomize build directory` would print (in resource order)."""
    return _render(Path(directory).resolve(), ())


def _render(directory: Path, seen: tuple[Path, ...]) -> list[Obj]:
    if directory in seen:
        raise UnsupportedKustomization(f"{directory}: kustomization cycle")
    path = directory / KUSTOMIZATION_FILE
    if not path.is_file():
        raise UnsupportedKustomization(f"{directory} has no {KUSTOMIZATION_FILE}")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise UnsupportedKustomization(f"{path}: not a mapping")
    unknown = set(spec) - SUPPORTED_KEYS
    if unknown:
        raise UnsupportedKustomization(f"{path}: unsupported kustomization keys {sorted(unknown)}")
    if spec.get("apiVersion", "kustomize.config.k8s.io/v1beta1") != "kustomize.config.k8s.io/v1beta1":
        raise UnsupportedKustomization(f"{path}: apiVersion {spec['apiVersion']!r}")
    if spec.get("kind", "Kustomization") != "Kustomization":
        raise UnsupportedKustomization(f"{path}: kind {spec['kind']!r}")

    objects: list[Obj] = []
    for entry in spec.get("resources") or []:
        if not isinstance(entry, str):
            raise UnsupportedKustomization(f"{path}: resource {entry!r} is not a path")
        target = (directory / entry).resolve()
        if target.is_dir():
            objects.extend(_render(target, (*seen, directory)))
        elif target.is_file():
            objects.extend(_load_objects(target))
        else:
            raise UnsupportedKustomization(f"{path}: resource {entry!r} does not exist")
    _check_unique(objects, path)

    for i, entry in enumerate(spec.get("patches") or []):
        _apply_patch_entry(objects, entry, directory, f"{path} patches[{i}]")
    for i, entry in enumerate(spec.get("images") or []):
        _apply_image(objects, entry, f"{path} images[{i}]")
    return objects


def _load_objects(path: Path) -> list[Obj]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for d in docs:
        if not isinstance(d, dict) or not {"apiVersion", "kind", "metadata"} <= set(d):
            raise UnsupportedKustomization(f"{path}: a document is not a Kubernetes object")
        if d["kind"] == "List":
            raise UnsupportedKustomization(f"{path}: List objects are not supported")
    return docs


def object_id(obj: Obj) -> tuple[str, str, str]:
    meta = obj.get("metadata") or {}
    return obj["kind"], meta.get("namespace", ""), meta.get("name", "")


def _check_unique(objects: list[Obj], where: Path) -> None:
    ids = [object_id(o) for o in objects]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise UnsupportedKustomization(f"{where}: objects defined twice: {dupes}")


# patches -----------------------------------------------------------------------------------------
def _apply_patch_entry(objects: list[Obj], entry: Any, directory: Path, where: str) -> None:
    if not isinstance(entry, dict) or set(entry) - PATCH_KEYS:
        raise UnsupportedKustomization(f"{where}: a patch takes only {sorted(PATCH_KEYS)}")
    if ("path" in entry) == ("patch" in entry):
        raise UnsupportedKustomization(f"{where}: give exactly one of path and patch")
    text = (directory / entry["path"]).read_text() if "path" in entry else entry["patch"]
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    target = entry.get("target")
    if target is not None and (not isinstance(target, dict) or set(target) - TARGET_KEYS):
        raise UnsupportedKustomization(f"{where}: target takes only {sorted(TARGET_KEYS)} (exact values)")

    if len(docs) == 1 and isinstance(docs[0], list):  # JSON 6902
        if target is None:
            raise UnsupportedKustomization(f"{where}: a JSON 6902 patch needs a target")
        matched = _select(objects, target)
        if not matched:
            raise PatchError(f"{where}: target {target} selects no object")
        for obj in matched:
            _json6902(obj, docs[0], where)
        return

    if not docs or not all(isinstance(d, dict) for d in docs):
        raise UnsupportedKustomization(f"{where}: neither a JSON 6902 list nor strategic-merge mappings")
    if target is not None and len(docs) > 1:
        raise UnsupportedKustomization(
            f"{where}: Multiple Strategic-Merge Patches in one `patches` entry is not allowed to set `patches.target`"
        )
    for doc in docs:
        _refuse_directives(doc, where)
        if target is not None:
            matched = _select(objects, target)
        else:
            kind, ns, name = object_id(doc)
            matched = [o for o in objects if o["kind"] == kind and o["metadata"].get("name") == name
                       and (not ns or o["metadata"].get("namespace", "") == ns)]
        if not matched:
            raise PatchError(f"{where}: strategic-merge patch of {object_id(doc)} selects no object")
        for obj in matched:
            body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
            extra = set(doc.get("metadata") or {}) - {"name", "namespace", "labels", "annotations"}
            if extra:
                raise UnsupportedKustomization(f"{where}: patching metadata {sorted(extra)} is not supported")
            meta = {k: v for k, v in (doc.get("metadata") or {}).items() if k in ("labels", "annotations")}
            if meta:
                body["metadata"] = meta
            merged = strategic_merge(obj, body, obj["kind"])
            obj.clear()
            obj.update(merged)


def _select(objects: list[Obj], target: dict[str, str]) -> list[Obj]:
    out = []
    for obj in objects:
        group, _, version = obj["apiVersion"].rpartition("/")
        meta = obj["metadata"]
        if "kind" in target and obj["kind"] != target["kind"]:
            continue
        if "name" in target and meta.get("name") != target["name"]:
            continue
        if "namespace" in target and meta.get("namespace", "") != target["namespace"]:
            continue
        if "group" in target and group != target["group"]:
            continue
        if "version" in target and version != target["version"]:
            continue
        out.append(obj)
    return out


def _refuse_directives(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str) and k.startswith("$"):
                raise UnsupportedKustomization(f"{where}: strategic-merge directive {k!r} is not supported")
            _refuse_directives(v, where)
    elif isinstance(value, list):
        for v in value:
            _refuse_directives(v, where)


def _merge_key(field: str, kind: str, parents: tuple[str, ...]) -> str | None:
    if field == "ports":
        # Container ports merge on containerPort, a Service's on port.
        return "containerPort" if parents and parents[-1] in ("containers", "initContainers") else (
            "port" if kind == "Service" else None
        )
    return MERGE_KEYS.get(field)


def strategic_merge(base: Any, patch: Any, kind: str, parents: tuple[str, ...] = ()) -> Any:
    """`patch` merged into a copy of `base` with the strategic-merge rules of the module docstring."""
    if not isinstance(patch, dict) or not isinstance(base, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = strategic_merge(out[key], value, kind, (*parents, key))
        elif isinstance(value, list) and isinstance(out.get(key), list) and _merge_key(key, kind, parents):
            out[key] = _merge_list(out[key], value, _merge_key(key, kind, parents), kind, (*parents, key))
        else:
            out[key] = copy.deepcopy(value)
    return out


def _merge_list(base: list[Any], patch: list[Any], key: str, kind: str, parents: tuple[str, ...]) -> list[Any]:
    out = copy.deepcopy(base)
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise UnsupportedKustomization(f"strategic merge of {'.'.join(parents)}: an item lacks {key!r}")
        for i, existing in enumerate(out):
            if isinstance(existing, dict) and existing.get(key) == item[key]:
                out[i] = strategic_merge(existing, item, kind, parents)
                break
        else:
            out.append(copy.deepcopy(item))
    return out


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"JSON pointer {path!r} does not start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _json6902(obj: Obj, ops: list[Any], where: str) -> None:
    for op in ops:
        if not isinstance(op, dict) or op.get("op") not in JSON6902_OPS:
            raise UnsupportedKustomization(f"{where}: JSON 6902 op {op!r} (supported: {sorted(JSON6902_OPS)})")
        parts = _pointer(op["path"])
        if not parts:
            raise UnsupportedKustomization(f"{where}: an op on the whole object")
        parent: Any = obj
        for p in parts[:-1]:
            parent = _step(parent, p, op["path"], where)
        last = parts[-1]
        kind = op["op"]
        if isinstance(parent, list):
            if kind == "add" and last == "-":
                parent.append(copy.deepcopy(op["value"]))
                continue
            if not last.isdigit() or int(last) > len(parent) or (kind != "add" and int(last) == len(parent)):
                raise PatchError(f"{where}: {op['path']} is not an index of the list")
            idx = int(last)
            if kind == "add":
                parent.insert(idx, copy.deepcopy(op["value"]))
            elif kind == "remove":
                del parent[idx]
            elif kind == "replace":
                parent[idx] = copy.deepcopy(op["value"])
            elif parent[idx] != op["value"]:
                raise PatchError(f"{where}: test of {op['path']} failed")
        elif isinstance(parent, dict):
            if kind != "add" and last not in parent:
                raise PatchError(f"{where}: {op['path']} does not exist")
            if kind in ("add", "replace"):
                parent[last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[last]
            elif parent[last] != op["value"]:
                raise PatchError(f"{where}: test of {op['path']} failed")
        else:
            raise PatchError(f"{where}: {op['path']}: parent is not a map or list")


def _step(node: Any, part: str, path: str, where: str) -> Any:
    if isinstance(node, dict) and part in node:
        return node[part]
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    raise PatchError(f"{where}: {path} does not exist")


# images ------------------------------------------------------------------------------------------
def split_image(image: str) -> tuple[str, str, str]:
    """(name, tag, digest) of an image reference; a registry port is part of the name."""
    rest, _, digest = image.partition("@")
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        return rest[:colon], rest[colon + 1 :], digest
    return rest, "", digest


def _apply_image(objects: list[Obj], entry: Any, where: str) -> None:
    if not isinstance(entry, dict) or "name" not in entry or set(entry) - IMAGE_KEYS or len(entry) < 2:
        raise UnsupportedKustomization(f"{where}: an image takes name and newName / newTag / digest")
    for container in _containers(objects):
        if "image" not in container:
            continue
        name, tag, digest = split_image(container["image"])
        if name != entry["name"]:
            continue
        name = entry.get("newName", name)
        if "newTag" in entry:
            tag, digest = str(entry["newTag"]), ""
        if "digest" in entry:
            tag, digest = "", entry["digest"]
        container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def _containers(value: Any) -> list[Obj]:
    out: list[Obj] = []
    if isinstance(value, dict):
        for key, v in value.items():
            if key in ("containers", "initContainers") and isinstance(v, list):
                out.extend(c for c in v if isinstance(c, dict))
            else:
                out.extend(_containers(v))
    elif isinstance(value, list):
        for v in value:
            out.extend(_containers(v))
    return out
