from __future__ import annotations

import pytest

from unimodel.core import subjects


@pytest.mark.parametrize("name", ["echo", "mlp_v2", "llama-3.1-8b", "org/model:latest", "a~7Eb", "Qwen2.5-0.5B"])
def test_model_names_round_trip_through_one_subject_token(name: str) -> None:
    subject = subjects.batch(name)
    token = subject.removeprefix(subjects.ROOT + ".batch.")
    assert "." not in token and "*" not in token and ">" not in token and " " not in token
    assert subjects.model_of(subject) == name
    assert subjects.model_of(subjects.route(name)) == name


def test_plain_names_stay_readable() -> None:
    assert subjects.batch("echo") == "unimodel.v1.batch.echo"
    assert subjects.route("llama-3.1") == "unimodel.v1.route.llama-3~2E1"


@pytest.mark.parametrize("name", ["", ".hidden", "a b", "x" * 129, "bad*", "tab\\t", "é"])
def test_invalid_model_names(name: str) -> None:
    assert not subjects.is_valid_model_name(name)
