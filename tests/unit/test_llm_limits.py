"""The generation limits (core/generation_rules.py, and the context helpers of worker/engines/generative.py): one rule for every engine."""

from __future__ import annotations

import pytest

from unimodel.core import errors, generation_rules, modelconfig
from unimodel.v1 import generate_pb2, model_pb2
from unimodel.worker.engines import generative


def _config(**llm_fields: object) -> model_pb2.ModelConfig:
    return modelconfig.parse({"name": "chat", "engine": "llamacpp", "llm": dict(llm_fields)})


def _sampling(**fields: object) -> generate_pb2.SamplingParams:
    return generate_pb2.SamplingParams(**fields)


def test_context_length_is_the_configs_or_the_engines_default() -> None:
    assert generative.context_length(_config(), 2048) == 2048
    assert generative.context_length(_config(context_length=4096), 2048) == 4096


def test_max_tokens_cap_defaults_to_the_context() -> None:
    assert generative.max_tokens_cap(_config(), 2048) == 2048
    assert generative.max_tokens_cap(_config(max_tokens=512), 2048) == 512


def test_check_max_tokens_names_the_limit() -> None:
    config = _config(max_tokens=100)
    generation_rules.check_max_tokens(config, 100)
    with pytest.raises(errors.InvalidArgument) as info:
        generation_rules.check_max_tokens(config, 101)
    assert info.value.metadata == {"model": "chat", "field": "max_tokens", "limit": "max_tokens"}
    assert "max_tokens 101" in info.value.message and "(max_tokens 100)" in info.value.message
    # no configured cap: the context is the cap; no context either: no check
    generation_rules.check_max_tokens(_config(), 2048, 2048)
    with pytest.raises(errors.InvalidArgument):
        generation_rules.check_max_tokens(_config(), 2049, 2048)
    generation_rules.check_max_tokens(_config(), 10**6, 0)


def test_resolve_max_tokens_explicit_value() -> None:
    config = _config(max_tokens=1024)
    assert generation_rules.resolve_max_tokens(config, _sampling(max_tokens=300), prompt_tokens=100, context=2048) == 300
    # exactly filling the context is allowed
    assert generation_rules.resolve_max_tokens(config, _sampling(max_tokens=1000), prompt_tokens=1048, context=2048) == 1000
    with pytest.raises(errors.InvalidArgument) as info:
        generation_rules.resolve_max_tokens(config, _sampling(max_tokens=1000), prompt_tokens=1049, context=2048)
    assert info.value.metadata["limit"] == "context_length" and info.value.metadata["field"] == "max_tokens"
    assert "context_length 2048" in info.value.message
    with pytest.raises(errors.InvalidArgument) as info:
        generation_rules.resolve_max_tokens(config, _sampling(max_tokens=1025), prompt_tokens=1, context=2048)
    assert info.value.metadata["limit"] == "max_tokens"


def test_resolve_max_tokens_default_is_trimmed_to_what_is_left() -> None:
    assert generation_rules.resolve_max_tokens(_config(), _sampling(), prompt_tokens=10, context=2048) == generation_rules.DEFAULT_MAX_TOKENS
    config = _config(default_max_tokens=300, max_tokens=200)
    assert generation_rules.resolve_max_tokens(config, _sampling(), prompt_tokens=10, context=2048) == 200  # the cap wins
    config = _config(default_max_tokens=300)
    assert generation_rules.resolve_max_tokens(config, _sampling(), prompt_tokens=2000, context=2048) == 48  # the context left
    assert generation_rules.resolve_max_tokens(config, _sampling(), prompt_tokens=2047, context=2048) == 1


def test_a_prompt_that_fills_the_context_is_refused() -> None:
    for prompt_tokens in (2048, 3000):
        with pytest.raises(errors.InvalidArgument) as info:
            generation_rules.resolve_max_tokens(_config(), _sampling(), prompt_tokens=prompt_tokens, context=2048)
        assert info.value.metadata == {"model": "chat", "field": "messages", "limit": "context_length"}
        assert f"{prompt_tokens} tokens" in info.value.message


def test_check_prompt_tokens_names_max_prompt_tokens() -> None:
    config = _config(context_length=2048, max_prompt_tokens=1536)
    generation_rules.check_prompt_tokens(config, 1536, 2048)
    with pytest.raises(errors.InvalidArgument) as info:
        generation_rules.check_prompt_tokens(config, 1537, 2048)
    assert info.value.metadata == {"model": "chat", "field": "messages", "limit": "max_prompt_tokens"}
    assert "max_prompt_tokens 1536" in info.value.message and "1537 tokens" in info.value.message
    # unset: the context is the cap
    generation_rules.check_prompt_tokens(_config(), 2048, 2048)
    with pytest.raises(errors.InvalidArgument, match="max_prompt_tokens 2048"):
        generation_rules.check_prompt_tokens(_config(), 2049, 2048)


def test_limit_errors_map_to_400() -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        generation_rules.check_prompt_tokens(_config(max_prompt_tokens=1), 2, 2048)
    assert info.value.http_status == 400 and info.value.to_json()["error"]["details"]["limit"] == "max_prompt_tokens"


def test_chat_messages_renders_developer_as_system_and_keeps_names() -> None:
    request = generate_pb2.GenerateRequest(
        messages=[
            generate_pb2.ChatMessage(role="developer", content="Be brief."),
            generate_pb2.ChatMessage(role="user", content="Hi", name="ann"),
            generate_pb2.ChatMessage(role="assistant", content="Hello!"),
        ]
    )
    assert generative.chat_messages(request) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi", "name": "ann"},
        {"role": "assistant", "content": "Hello!"},
    ]
    assert generative.chat_messages(generate_pb2.GenerateRequest(prompt="raw")) == []
