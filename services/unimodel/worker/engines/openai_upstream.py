"""The ``openai`` engine: a model served by an upstream OpenAI-compatible server (``vllm serve``, Ollama,
LMDeploy, trtllm-serve, llama.cpp's server, llama-cpp-python's server).

The worker keeps one ``httpx.AsyncClient`` per model (keep-alive pool sized to ``concurrency``) and
streams ``/chat/completions`` (messages as they are: the upstream applies its own chat template) or
``/completions`` (the raw prompt) as server-sent events. Closing the iteration closes the HTTP stream,
which is how an OpenAI server learns that the client left (vLLM and llama.cpp abort the sequence).

Token counts: the prompt is tokenized upstream, so ``Prompt.prompt_tokens`` is 0 after ``prepare`` and
the count arrives on the final :class:`Delta` (``prompt_tokens``), from the usage the upstream sends when
asked (``stream_options.include_usage``). An upstream that sends no usage in streams (llama-cpp-python's
server) gets counts estimated from the stream: one token per content chunk (those servers stream one
token per chunk), prompt tokens 0. ``metadata()["usage"]`` says which applies (``upstream`` /
``estimated``) once a generation has ended.

Errors: connection failures and 5xx -> ``Unavailable`` (retry_after from the upstream's Retry-After, else
1 s); 429 -> ``ResourceExhausted``; 401/403/404 -> ``FailedPrecondition`` (our configuration: key, model
name); other 4xx -> ``InvalidArgument`` with the upstream's message (the request's fault: the client reads
why). Every other upstream answer body (load's GET /models, 401/403/404/429/5xx, errors in the stream) is
logged, truncated, and never copied into the model's status or a client's error: those say "answered HTTP
401". Which upstream URL and key variable a model may name is the operator's choice (the workers'
``upstream_urls`` / ``upstream_key_envs``, checked by the worker's model table before this engine is built).

Engine options (ModelConfig.options): ``timeout_s`` longest wait for the upstream's next byte (default
600), ``connect_timeout_s`` (default 5).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import httpx

from unimodel.core import errors, generation_rules
from unimodel.v1 import generate_pb2, model_pb2
from unimodel.worker.engines import generative
from unimodel.worker.engines.engine import engine_option
from unimodel.worker.engines.generative import Delta, GenerativeEngine, Prompt

log = logging.getLogger(__name__)

DEFAULT_SEQUENCES = 64
DEFAULT_RETRY_AFTER_S = 1.0
SEND_ATTEMPTS = 3
"""Sends of a request whose pooled connection the upstream had closed before answering (see _open)."""
_MESSAGE_LIMIT = 500
_FINISH = {"stop": generative.FINISH_STOP, "length": generative.FINISH_LENGTH, "abort": generative.FINISH_ABORT}


def upstream_message(response: httpx.Response) -> str:
    """The upstream's error text: OpenAI's {"error": {"message"}}, FastAPI's {"detail"}, or the body."""
    text = response.text
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    message: Any = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            message = err.get("message")
        elif isinstance(err, str):
            message = err
        message = message or body.get("message") or body.get("detail")
    if message is not None and not isinstance(message, str):
        message = json.dumps(message)
    message = (message or text or response.reason_phrase or "").strip()
    return message[:_MESSAGE_LIMIT]


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return DEFAULT_RETRY_AFTER_S


class UpstreamEngine(GenerativeEngine):
    """Fronts an OpenAI-compatible server: ``UpstreamEngine(config)``, then ``await load()``."""

    kind = "openai"

    def __init__(self, config: model_pb2.ModelConfig) -> None:
        super().__init__(config)
        llm_config = config.llm
        self.base_url = llm_config.upstream_url.rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise errors.InvalidArgument(
                f"model {config.name!r}: llm.upstream_url must be the upstream's base URL (http://host:port/v1)",
                field="llm.upstream_url",
            )
        self.upstream_model = llm_config.upstream_model or config.name
        self.context = generative.context_length(config, 0)  # 0: the upstream's (learned from /models when it says)
        self.read_timeout_s = engine_option(config, "timeout_s", float, 600.0, positive=True)
        self.connect_timeout_s = engine_option(config, "connect_timeout_s", float, 5.0, positive=True)
        self._client: httpx.AsyncClient | None = None
        self._usage_source = ""

    @property
    def concurrency(self) -> int:
        return self.config.llm.max_sequences or DEFAULT_SEQUENCES

    def _where(self) -> str:
        """For load errors (the operator reads them): names the upstream's URL."""
        return f"model {self.config.name!r}: upstream {self.base_url}"

    def _failed(self, why: str, retry_after_s: float = DEFAULT_RETRY_AFTER_S) -> errors.Unavailable:
        """A generation the upstream failed: the client reads it, so no URL (the log has it)."""
        log.warning("%s: %s", self._where(), why)
        return errors.Unavailable(
            f"model {self.config.name!r}: the upstream server {why}", retry_after_s=retry_after_s, model=self.config.name
        )

    def _headers(self) -> dict[str, str]:
        env = self.config.llm.upstream_api_key_env
        if not env:
            return {}
        key = os.environ.get(env, "")
        if not key:
            raise errors.FailedPrecondition(
                f"{self._where()}: llm.upstream_api_key_env names {env}, which is not set in the worker's environment"
            )
        return {"Authorization": f"Bearer {key}"}

    async def load(self) -> None:
        if self._client is not None:
            return
        n = self.concurrency
        client = httpx.AsyncClient(
            base_url=self.base_url + "/",
            headers=self._headers(),
            timeout=httpx.Timeout(self.read_timeout_s, connect=self.connect_timeout_s, pool=None),
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
            follow_redirects=False,
        )
        try:
            await self._check_upstream(client)
        except BaseException:
            await client.aclose()
            raise
        self._client = client

    async def _check_upstream(self, client: httpx.AsyncClient) -> None:
        """GET {upstream}/models: reachable, and it serves our model (when it lists any)."""
        try:
            response = await client.get("models", timeout=httpx.Timeout(max(10.0, self.connect_timeout_s)))
        except httpx.HTTPError as exc:
            raise errors.FailedPrecondition(
                f"{self._where()} is not reachable ({type(exc).__name__}: {exc or 'no answer'}); "
                f"start the server or fix llm.upstream_url"
            ) from None
        if response.status_code != 200:
            log.warning("%s: GET /models answered %d: %s", self._where(), response.status_code, upstream_message(response))
            raise errors.FailedPrecondition(
                f"{self._where()}: GET /models answered HTTP {response.status_code} (its answer is in the worker's log)"
            )
        try:
            listed = response.json().get("data") or []
            models = {m["id"]: m for m in listed if isinstance(m, dict) and "id" in m}
        except (ValueError, AttributeError):
            raise errors.FailedPrecondition(f"{self._where()}: GET /models did not answer an OpenAI model list") from None
        if models and self.upstream_model not in models:
            raise errors.FailedPrecondition(
                f"{self._where()} does not serve {self.upstream_model!r} (it serves {', '.join(sorted(models))}); "
                f"set llm.upstream_model"
            )
        card = models.get(self.upstream_model) or {}
        if not self.context and isinstance(card.get("max_model_len"), int):  # vLLM says its context
            self.context = card["max_model_len"]

    async def unload(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def metadata(self) -> dict[str, str]:
        out = {
            "upstream_url": self.base_url,
            "upstream_model": self.upstream_model,
            "chat_template": "upstream",
            "tokenizer": "upstream",
        }
        if self.context:
            out["context_length"] = str(self.context)
        if self._usage_source:
            out["usage"] = self._usage_source
        return out

    async def prepare(self, request: generate_pb2.GenerateRequest, request_id: str) -> Prompt:
        """Limits that can be checked without the tokenizer; the prompt's own limits are the upstream's."""
        sampling = request.sampling
        generation_rules.validate(request)  # the gateway's rules, again: the worker may be reached directly
        asked = sampling.max_tokens
        generation_rules.check_max_tokens(self.config, asked, self.context)
        if asked:
            max_tokens = asked
        else:
            default = self.config.llm.default_max_tokens or generation_rules.DEFAULT_MAX_TOKENS
            max_tokens = min(default, generative.max_tokens_cap(self.config, self.context) or default)
        if request.messages:
            messages = generative.chat_messages(request)
            text = ""
        else:
            messages = None
            text = request.prompt
        return Prompt(
            request_id=request_id,
            text=text,
            prompt_tokens=0,
            max_tokens=max_tokens,
            sampling=sampling,
            stop=[s for s in sampling.stop if s],
            engine_state=messages,
        )

    def _body(self, prompt: Prompt) -> tuple[str, dict[str, Any]]:
        s = prompt.sampling
        body: dict[str, Any] = {
            "model": self.upstream_model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": prompt.max_tokens,
        }
        if prompt.engine_state is not None:
            path = "chat/completions"
            body["messages"] = prompt.engine_state
        else:
            path = "completions"
            body["prompt"] = prompt.text
        if s.HasField("temperature"):
            body["temperature"] = s.temperature
        if s.HasField("top_p"):
            body["top_p"] = s.top_p
        if s.HasField("seed"):
            body["seed"] = s.seed
        if s.presence_penalty:
            body["presence_penalty"] = s.presence_penalty
        if s.frequency_penalty:
            body["frequency_penalty"] = s.frequency_penalty
        if s.top_k > 0:
            body["top_k"] = s.top_k  # not OpenAI's: vLLM, llama.cpp, Ollama, LMDeploy take it
        if s.min_tokens:
            body["min_tokens"] = min(s.min_tokens, prompt.max_tokens)  # vLLM's, like ignore_eos
        if s.ignore_eos:
            body["ignore_eos"] = True
        if prompt.stop:
            body["stop"] = list(prompt.stop)
        return path, body

    def _error(self, response: httpx.Response) -> errors.UnimodelError:
        """The error for an upstream's 4xx/5xx: only a request's own fault (400, 422, ...) carries the
        upstream's words; for the rest they go to the log (they may name keys, hosts or internals)."""
        status, message = response.status_code, upstream_message(response)
        if status >= 500 or status in (401, 403, 404):
            log.warning("%s answered %d: %s", self._where(), status, message)
        if status >= 500:
            return self._failed(f"answered HTTP {status}", _retry_after(response))
        text = f"model {self.config.name!r}: the upstream server answered HTTP {status}"
        if status == 429:
            log.info("%s answered 429: %s", self._where(), message)
            return errors.ResourceExhausted(text, retry_after_s=_retry_after(response), model=self.config.name)
        if status in (401, 403, 404):  # our configuration (key, model name), not the request
            return errors.FailedPrecondition(text + " (the worker's log has its answer)", model=self.config.name)
        return errors.InvalidArgument(f"upstream: {message}", model=self.config.name, upstream_status=str(status))

    async def _open(self, client: httpx.AsyncClient, stack: contextlib.AsyncExitStack, path: str, body: dict[str, Any]) -> httpx.Response:
        """POST the streaming request; sent again (up to SEND_ATTEMPTS in all) when a pooled keep-alive
        connection turns out to have been closed by the upstream (no response was received, so nothing
        started upstream). More than one pooled connection can be stale at once: llama-cpp-python's server
        closes a connection shortly after a stream it broke off, and after an upstream restart every idle
        one is gone."""
        for attempt in range(1, SEND_ATTEMPTS + 1):
            try:
                response = await stack.enter_async_context(client.stream("POST", path, json=body))
                break
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                if attempt == SEND_ATTEMPTS:
                    raise
                log.debug("model %s: upstream closed a pooled connection; sending again", self.model)
        if response.status_code >= 400:
            await response.aread()
            raise self._error(response)
        return response

    async def _events(self, response: httpx.Response) -> AsyncGenerator[dict[str, Any], None]:
        """The JSON events of the stream, read to the end of the body (not just to [DONE]: the
        connection then goes back to the pool)."""
        done = False
        async with contextlib.aclosing(_sse_events(response)) as events:
            async for event in events:
                if done:
                    continue
                if event == "[DONE]":
                    done = True
                    continue
                try:
                    data = json.loads(event)
                except ValueError:
                    raise self._failed("sent a malformed event") from None
                if not isinstance(data, dict):
                    continue
                if "error" in data:  # an error after the stream started (vLLM, llama.cpp)
                    err = data["error"]
                    message = err.get("message", "") if isinstance(err, dict) else str(err)
                    log.warning("%s: error in the stream: %s", self._where(), str(message)[:_MESSAGE_LIMIT])
                    raise self._failed("failed during the generation")
                yield data

    async def generate(self, prompt: Prompt) -> AsyncIterator[Delta]:
        client = self._client
        if client is None:
            raise errors.FailedPrecondition(f"model {self.config.name!r} is not loaded")
        path, body = self._body(prompt)
        finished = False
        chunks = 0  # content chunks: the token estimate when the upstream sends no usage
        finish = ""
        usage: dict[str, Any] | None = None
        answered = False  # the upstream answered 200: a failure from then on broke its stream off
        try:
            async with contextlib.AsyncExitStack() as stack:
                response = await self._open(client, stack, path, body)
                answered = True
                events = await stack.enter_async_context(contextlib.aclosing(self._events(response)))
                async for data in events:
                    if isinstance(data.get("usage"), dict):
                        usage = data["usage"]
                    for choice in data.get("choices") or ():
                        text = _choice_text(choice)
                        if text:
                            chunks += 1
                            yield Delta(text=text, tokens=1)
                        if choice.get("finish_reason"):
                            finish = _FINISH.get(choice["finish_reason"], generative.FINISH_STOP)
            if not finish:
                raise self._failed("ended the stream before the generation finished")
            if usage is not None:
                self._usage_source = "upstream"
                completion = int(usage.get("completion_tokens") or 0)
                prompt_tokens = int(usage.get("prompt_tokens") or 0)
            else:
                self._usage_source = "estimated"
                completion, prompt_tokens = chunks, 0
            finished = True
            yield Delta(
                tokens=max(0, completion - chunks),
                finish_reason=finish,
                completion_tokens=completion,
                prompt_tokens=prompt_tokens,
            )
        except (GeneratorExit, asyncio.CancelledError):
            if not finished:  # the caller left: the stream is closed already, which aborts upstream
                self.aborted += 1
            raise
        except httpx.HTTPError as exc:
            if answered:  # e.g. the connection closed before the end of the body (RemoteProtocolError)
                raise self._failed(f"ended the stream before the generation finished ({type(exc).__name__})") from None
            raise self._failed(f"could not be reached or went away ({type(exc).__name__})") from None


def _choice_text(choice: dict[str, Any]) -> str:
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return delta.get("content") or ""
    return choice.get("text") or ""


async def _sse_events(response: httpx.Response) -> AsyncGenerator[str, None]:
    """The data of each server-sent event (multi-line data joined with newlines)."""
    data: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)

