"""Model registration requests: repository names, paths inside the models root only, overrides."""

from pathlib import Path

import pytest

from unimodel.core import errors, modelconfig
from unimodel.gateway.admin.registration import repository_models, resolve


def make_model(folder: Path, name: str = "m", **extra: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = modelconfig.parse(
        {
            "name": name,
            "engine": "delay",
            "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
            "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}],
            "max_batch_size": 8,
            **extra,
        }
    )
    modelconfig.write(folder, config)
    return folder


def test_by_name_from_the_repository(tmp_path: Path) -> None:
    make_model(tmp_path / "repo" / "m")
    config = resolve({"name": "m"}, str(tmp_path / "repo"), "")
    assert config.name == "m" and config.path == str((tmp_path / "repo" / "m").resolve())
    assert config.max_batch_size == 8 and config.version == "1"


def test_by_path_inside_the_root_with_a_new_name_and_overrides(tmp_path: Path) -> None:
    make_model(tmp_path / "root" / "team" / "m")
    config = resolve(
        {"name": "team/m", "path": "team/m", "config": {"replicas": 2, "batching": {"max_queue_delay_ms": 3}}},
        "",
        str(tmp_path / "root"),
    )
    assert config.name == "team/m" and config.replicas == 2 and config.batching.max_queue_delay_ms == 3
    assert config.max_batch_size == 8


@pytest.mark.parametrize("path", ["../outside", "/etc", "link/.."])
def test_paths_outside_the_models_root_are_forbidden(tmp_path: Path, path: str) -> None:
    make_model(tmp_path / "outside")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(errors.PermissionDenied):
        resolve({"path": path}, "", str(tmp_path / "root"))


def test_a_symlink_out_of_the_root_is_forbidden(tmp_path: Path) -> None:
    make_model(tmp_path / "outside")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(errors.PermissionDenied) as exc:
        resolve({"path": "link"}, "", str(tmp_path / "root"))
    assert exc.value.http_status == 403


@pytest.mark.parametrize(
    ("body", "error", "text"),
    [
        ({}, errors.InvalidArgument, "name or path is required"),
        ({"name": "m", "bogus": 1}, errors.InvalidArgument, "unknown field"),
        ({"name": "nope"}, errors.NotFound, "no model folder"),
        ({"name": "../m"}, errors.InvalidArgument, "invalid model name"),
        ({"name": "m", "config": {"max_batch_size": -1}}, errors.InvalidArgument, "max_batch_size"),
        ({"name": "m", "config": {"no_such_field": 1}}, errors.InvalidArgument, "no_such_field"),
        ({"name": "m", "config": {"engine": "tensorrt"}}, errors.InvalidArgument, "unknown engine"),
        ([1, 2], errors.InvalidArgument, "JSON object"),
    ],
)
def test_bad_requests_name_the_problem(tmp_path: Path, body: object, error: type, text: str) -> None:
    make_model(tmp_path / "repo" / "m")
    with pytest.raises(error) as exc:
        resolve(body, str(tmp_path / "repo"), "")
    assert text in exc.value.message


def test_by_path_needs_a_root(tmp_path: Path) -> None:
    with pytest.raises(errors.PermissionDenied):
        resolve({"path": "/x"}, "", "")


def test_repository_models_all_skips_hidden_and_incomplete(tmp_path: Path) -> None:
    make_model(tmp_path / "a", "a")
    make_model(tmp_path / ".tmp-b", "b")
    (tmp_path / "c").mkdir()
    assert [p.name for p in repository_models(str(tmp_path), "all")] == ["a"]
    assert [p.name for p in repository_models(str(tmp_path), "a, c")] == ["a", "c"]
    assert repository_models(str(tmp_path), "") == []
