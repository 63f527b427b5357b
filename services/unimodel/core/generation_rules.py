"""Text generation rules shared by the gateway (HTTP, gRPC) and the workers: what a valid GenerateRequest
is, and the per-model limits (LlmConfig). Plain logic: no transport, no engine.
"""

from __future__ import annotations

import hashlib

from unimodel.core import errors
from unimodel.v1 import generate_pb2, model_pb2

ROLES = frozenset({"system", "developer", "user", "assistant"})
MAX_STOP = 4
MAX_TOKENS_ABSURD = 1 << 20
"""max_tokens above this is refused whatever the model (a typo or an attack, never a real request)."""
DEFAULT_MAX_TOKENS = 256
SESSION_PREFIX_MESSAGES = 2
"""A conversation's derived affinity key hashes its first messages (system prompt + first user turn):
every later turn of the same conversation starts with them."""


def _bad(message: str, field: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(message, field=field)


def validate(request: generate_pb2.GenerateRequest) -> None:
    """Everything about a request that does not depend on the model (400 naming the field)."""
    if request.messages:
        for i, m in enumerate(request.messages):
            if m.role not in ROLES:
                raise _bad(
                    f"messages[{i}].role: {m.role!r} is not one of {', '.join(sorted(ROLES))}", f"messages[{i}].role"
                )
        if all(m.role in ("system", "developer") for m in request.messages):
            raise _bad("messages: at least one user or assistant message is required", "messages")
    elif not request.prompt:
        raise _bad("messages (chat) or prompt (completion) is required and must not be empty", "messages")
    s = request.sampling
    if s.HasField("temperature") and not 0.0 <= s.temperature <= 2.0:
        raise _bad(f"temperature {s.temperature:g} is out of range (0 to 2)", "temperature")
    if s.HasField("top_p") and not 0.0 < s.top_p <= 1.0:
        raise _bad(f"top_p {s.top_p:g} is out of range (greater than 0, at most 1)", "top_p")
    if s.max_tokens < 0:
        raise _bad(f"max_tokens {s.max_tokens} must be at least 1", "max_tokens")
    if s.max_tokens > MAX_TOKENS_ABSURD:
        raise _bad(f"max_tokens {s.max_tokens} is absurdly large (limit {MAX_TOKENS_ABSURD})", "max_tokens")
    if len(s.stop) > MAX_STOP:
        raise _bad(f"stop: at most {MAX_STOP} sequences, got {len(s.stop)}", "stop")
    if any(not x for x in s.stop):
        raise _bad("stop: sequences must not be empty", "stop")
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(s, name)
        if not -2.0 <= v <= 2.0:
            raise _bad(f"{name} {v:g} is out of range (-2 to 2)", name)
    if s.top_k < 0:
        raise _bad(f"top_k {s.top_k} must be >= 0", "top_k")
    if s.min_tokens < 0:
        raise _bad(f"min_tokens {s.min_tokens} must be >= 0", "min_tokens")
    if s.max_tokens and s.min_tokens > s.max_tokens:
        raise _bad(f"min_tokens {s.min_tokens} is more than max_tokens {s.max_tokens}", "min_tokens")


def session_key(request: generate_pb2.GenerateRequest) -> str:
    """The affinity key: the request's session, else a hash of the conversation's first messages (or of
    the prompt's start for completions)."""
    if request.session:
        return request.session
    h = hashlib.blake2b(digest_size=8)
    if request.messages:
        for m in request.messages[:SESSION_PREFIX_MESSAGES]:
            h.update(m.role.encode())
            h.update(b"\0")
            h.update(m.content.encode())
            h.update(b"\1")
    else:
        h.update(request.prompt[:256].encode())
    return h.hexdigest()


# per-model limits ----------------------------------------------------------------------------------
def check_max_tokens(config: model_pb2.ModelConfig, requested: int, context: int = 0) -> None:
    """400 when a request asks for more tokens than the model's cap (llm.max_tokens, else its context)."""
    cap = config.llm.max_tokens or context or config.llm.context_length
    if cap and requested > cap:
        raise errors.InvalidArgument(
            f"max_tokens {requested} is over the limit of model {config.name!r} (max_tokens {cap})",
            model=config.name, field="max_tokens", limit="max_tokens",
        )


def check_prompt_tokens(config: model_pb2.ModelConfig, prompt_tokens: int, context: int) -> None:
    cap = config.llm.max_prompt_tokens or context
    if cap and prompt_tokens > cap:
        raise errors.InvalidArgument(
            f"the prompt has {prompt_tokens} tokens, over the limit of model {config.name!r} "
            f"(max_prompt_tokens {cap})",
            model=config.name, field="messages", limit="max_prompt_tokens",
        )


def resolve_max_tokens(
    config: model_pb2.ModelConfig, sampling: generate_pb2.SamplingParams, prompt_tokens: int, context: int
) -> int:
    """The request's max_tokens (or the model's default), checked against the cap; a default is trimmed
    to the context that is left, an explicit value over it is refused."""
    asked = sampling.max_tokens
    check_max_tokens(config, asked, context)
    left = context - prompt_tokens
    if left <= 0:
        raise errors.InvalidArgument(
            f"the prompt has {prompt_tokens} tokens and fills the context of model {config.name!r} "
            f"(context_length {context})",
            model=config.name, field="messages", limit="context_length",
        )
    if asked:
        if asked > left:
            raise errors.InvalidArgument(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({asked}) exceed the context of model "
                f"{config.name!r} (context_length {context})",
                model=config.name, field="max_tokens", limit="context_length",
            )
        return asked
    default = config.llm.default_max_tokens or DEFAULT_MAX_TOKENS
    cap = config.llm.max_tokens or context
    return max(1, min(default, left, cap))
