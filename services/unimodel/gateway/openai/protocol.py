"""OpenAI's chat and completions protocol: request bodies (OpenAPI documents them; extra fields are
ignored, as OpenAI's server does) -> a GenerateRequest, and the answers' shapes (whole, SSE chunks).
Plain logic: no transport."""

from __future__ import annotations

import time
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidatorFunctionWrapHandler, field_validator
from pydantic_core import PydanticCustomError

from unimodel.core import errors
from unimodel.gateway import json_body
from unimodel.v1 import generate_pb2


# request bodies (OpenAPI documents them; extra fields are ignored, as OpenAI's server does) ---------------
class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    role: str = Field(..., description="system, developer, user or assistant")
    content: str | list[TextPart] | None = Field(..., description="text, or a list of text parts")
    name: str | None = None

    @field_validator("content", mode="wrap")
    @classmethod
    def _content(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:  # one message instead of one per member of the union
            raise PydanticCustomError("content", "must be a string or a list of text parts") from None


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float | None = Field(None, description="0 to 2; 0 = greedy")
    top_p: float | None = Field(None, description="greater than 0, at most 1")
    max_tokens: int | None = Field(None, description="tokens to generate at most (default: the model's)")
    stop: str | list[str] | None = Field(None, description="up to 4 stop sequences")
    seed: json_body.Int64 | None = Field(None, description="sampling seed (a signed 64-bit integer)")
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: json_body.NonNegInt32 | None = Field(None, description="extension: sample among the k most likely tokens")
    min_tokens: int | None = Field(None, description="extension (vLLM's): no end of sequence before this many tokens")
    ignore_eos: bool = Field(False, description="extension (vLLM's): generate until max_tokens or a stop string")
    n: int | None = Field(None, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="end-user id: also the affinity key (one conversation, one worker)")


class ChatCompletionBody(_Sampling):
    messages: list[ChatMessageIn] = Field(..., description="the conversation")
    max_completion_tokens: int | None = Field(None, description="alias of max_tokens")
    cache: bool | None = Field(
        None, description="extension: use the semantic cache for this request (default: the model's `cache` setting)"
    )


class CompletionBody(_Sampling):
    prompt: str | list[str] = Field(..., description="the prompt (a list of one string is accepted)")
    echo: bool = False


def _sampling(body: _Sampling, max_tokens: int | None) -> generate_pb2.SamplingParams:
    if body.n not in (None, 1):
        raise errors.InvalidArgument(f"n {body.n} is not supported (only 1)", field="n")
    s = generate_pb2.SamplingParams()
    if body.temperature is not None:
        s.temperature = body.temperature
    if body.top_p is not None:
        s.top_p = body.top_p
    if max_tokens is not None:
        if max_tokens < 1:
            raise errors.InvalidArgument(f"max_tokens {max_tokens} must be at least 1", field="max_tokens")
        s.max_tokens = min(max_tokens, 1 << 30)
    if body.stop is not None:
        s.stop.extend([body.stop] if isinstance(body.stop, str) else body.stop)
    if body.seed is not None:
        s.seed = body.seed
    s.presence_penalty = body.presence_penalty or 0.0
    s.frequency_penalty = body.frequency_penalty or 0.0
    if body.top_k is not None:
        s.top_k = body.top_k
    if body.min_tokens is not None:
        s.min_tokens = max(-1, min(body.min_tokens, 1 << 30))  # validate() names a negative one
    s.ignore_eos = body.ignore_eos
    return s


def chat_request(body: ChatCompletionBody, session: str) -> generate_pb2.GenerateRequest:
    request = generate_pb2.GenerateRequest(model=body.model, session=session or body.user or "")
    if not body.messages:
        raise errors.InvalidArgument("messages must not be empty", field="messages")
    for i, m in enumerate(body.messages):
        content = m.content
        if content is None:
            if m.role != "assistant":
                raise errors.InvalidArgument(f"messages[{i}].content is required", field=f"messages[{i}].content")
            content = ""
        elif isinstance(content, list):
            content = "".join(part.text for part in content)
        request.messages.add(role=m.role, content=content, name=m.name or "")
    max_tokens = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
    request.sampling.CopyFrom(_sampling(body, max_tokens))
    return request


def completion_request(body: CompletionBody, session: str) -> generate_pb2.GenerateRequest:
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise errors.InvalidArgument("prompt: a list must hold exactly one string (batched prompts are not supported)", field="prompt")
        prompt = prompt[0]
    if not prompt:
        raise errors.InvalidArgument("prompt must not be empty", field="prompt")
    if body.echo:
        raise errors.InvalidArgument("echo is not supported", field="echo")
    request = generate_pb2.GenerateRequest(model=body.model, prompt=prompt, session=session or body.user or "")
    request.sampling.CopyFrom(_sampling(body, body.max_tokens))
    return request


# answers -------------------------------------------------------------------------------------------
def _usage(usage: generate_pb2.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


class AnswerShape:
    """What differs between chat and completions answers.

    `text_event(text)` is the streamed chunk of one delta of text, the event of every token: the bytes
    `chunk(text, None)` makes, from a prefix and a suffix built once per answer around the
    text's JSON string (orjson), instead of a dict encoded per token."""

    def __init__(self, chat: bool, rid: str, model: str) -> None:
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + rid
        self.model = model
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        head = b"data: " + orjson.dumps({"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model})[:-1]
        tail = b',"system_fingerprint":null}\n\n'
        if chat:
            self._text_head = head + b',"choices":[{"index":0,"delta":{"content":'
            self._text_tail = b'},"finish_reason":null,"logprobs":null}]' + tail
        else:
            self._text_head = head + b',"choices":[{"index":0,"text":'
            self._text_tail = b',"finish_reason":null,"logprobs":null}]' + tail

    def text_event(self, text: str) -> bytes:
        """The SSE event of one delta of text (not the last chunk: no finish_reason)."""
        return self._text_head + orjson.dumps(text) + self._text_tail

    def whole(self, text: str, finish: str, usage: generate_pb2.Usage) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish or "stop", "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {
            "id": self.id, "object": self.object, "created": self.created, "model": self.model,
            "choices": [choice], "usage": _usage(usage), "system_fingerprint": None,
        }

    def chunk(self, text: str | None, finish: str | None, *, role: bool = False, usage: Any = None) -> bytes:
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        doc = {
            "id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
            "choices": [choice], "system_fingerprint": None,
        }
        if usage is not None:
            doc["usage"] = usage
        return b"data: " + orjson.dumps(doc) + b"\n\n"

    def usage_chunk(self, usage: generate_pb2.Usage) -> bytes:
        doc = {
            "id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
            "choices": [], "usage": _usage(usage), "system_fingerprint": None,
        }
        return b"data: " + orjson.dumps(doc) + b"\n\n"

