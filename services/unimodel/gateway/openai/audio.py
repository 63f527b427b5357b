"""OpenAI's audio API on the gateway (protocol translation only):

    POST /v1/audio/transcriptions   multipart: file, model, language, prompt, response_format, temperature,
                                    timestamp_granularities[] (segment)
    POST /v1/audio/translations     multipart: file, model, prompt, response_format, temperature (into English)

The upload becomes one predict value, {"audio": base64, "task", "language", "prompt", "temperature"}, for a
speech-to-text model (engine whisper: worker/engines/whisper.py), sent through the batcher like every other
request, so concurrent uploads share a batch. The worker decodes the file (WAV, FLAC, MP3, OGG: 415 for
other formats, 413 over the model's `max_audio_seconds`, 400 when damaged or empty). response_format:
`json` {"text", "usage"}, `text` (text/plain), `verbose_json` {"task", "language", "duration", "text",
"segments": [{"id", "seek", "start", "end", "text"}], "usage"}, `srt`, `vtt`. `language` in answers is the
ISO-639-1 code the model used (given or detected). Errors use OpenAI's shape.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response
from google.protobuf import json_format, struct_pb2
from starlette.datastructures import UploadFile

from unimodel.core import errors
from unimodel.core.modelconfig import SPEECH_ENGINES
from unimodel.gateway.http_context import http_context, id_headers, starlette_header
from unimodel.gateway.openai.errors import openai_error
from unimodel.gateway.ports import OpenAiPorts

FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
MAX_FIELD_CHARS = 4096  # prompt and the small fields
_FIELDS = {
    "transcriptions": frozenset(
        {"file", "model", "language", "prompt", "response_format", "temperature", "timestamp_granularities[]", "timestamp_granularities", "stream"}
    ),
    "translations": frozenset({"file", "model", "prompt", "response_format", "temperature"}),
}


def openapi_form(task: str) -> dict[str, Any]:
    """The multipart body, for /docs (the route reads the form itself: its errors are OpenAI-shaped)."""
    props: dict[str, Any] = {
        "file": {"type": "string", "format": "binary", "description": "the audio file: WAV, FLAC, MP3 or OGG"},
        "model": {"type": "string", "description": "a speech-to-text model, e.g. whisper-base"},
        "prompt": {"type": "string", "description": "text that came before, or spellings to prefer"},
        "response_format": {"type": "string", "enum": list(FORMATS), "default": "json"},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1, "default": 0},
    }
    if task == "transcriptions":
        props["language"] = {"type": "string", "description": "ISO-639-1 code of the speech (absent: detected)"}
        props["timestamp_granularities[]"] = {"type": "array", "items": {"type": "string", "enum": ["segment"]}}
    schema = {"type": "object", "required": ["file", "model"], "properties": props}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


async def answer(gw: OpenAiPorts, request: Request, task: str) -> Response:
    """POST /v1/audio/{transcriptions|translations}."""
    try:
        ctx = http_context(starlette_header(request.headers), gw.settings.request_timeout_s)
        model, value, response_format, granularities = await _read(gw, request, task)
        reply = await gw.predict(model, value, {}, ctx, api="openai")
        result = json_format.MessageToDict(reply.output)
        if not isinstance(result, dict) or "text" not in result:
            raise errors.InvalidArgument(f"model {model!r} did not answer with a transcript", field="model")
        body, media_type = render(result, response_format, "translate" if task == "translations" else "transcribe", granularities)
    except errors.UnimodelError as err:
        return openai_error(err)
    return Response(body, 200, headers=id_headers(ctx), media_type=media_type)


async def _read(gw: OpenAiPorts, request: Request, task: str) -> tuple[str, struct_pb2.Value, str, list[str]]:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise errors.InvalidArgument("send the audio as multipart/form-data (fields file, model, ...)", field="file")
    try:
        form = await request.form(max_files=1, max_fields=16)
    except Exception as exc:  # python-multipart's parse errors, Starlette's limits: a bad upload, never a 500
        message = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
        raise errors.InvalidArgument(f"cannot read the multipart body: {' '.join(str(message).split())[:200]}", field="file") from None
    try:
        unknown = sorted(set(form.keys()) - _FIELDS[task])
        if unknown:
            raise errors.InvalidArgument(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(_FIELDS[task]))}", field=unknown[0])
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise errors.InvalidArgument("the audio file (field 'file', a file upload) is required", field="file")
        content = await upload.read()
        model = _text(form, "model")
        if not model:
            raise errors.InvalidArgument("model is required", field="model")
        _check_model(gw, model)
        response_format = _text(form, "response_format") or "json"
        if response_format not in FORMATS:
            raise errors.InvalidArgument(f"response_format must be one of {', '.join(FORMATS)}", field="response_format")
        if _text(form, "stream").lower() in ("true", "1"):
            raise errors.InvalidArgument("stream=true is not supported for audio; the transcript comes whole", field="stream")
        granularities = [str(g) for g in form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")]
        bad = [g for g in granularities if g != "segment"]
        if bad:
            raise errors.InvalidArgument(
                f"timestamp_granularities: only 'segment' is supported (got {bad[0][:20]!r})", field="timestamp_granularities[]"
            )
        fields: dict[str, Any] = {"audio": base64.b64encode(content).decode(), "task": "translate" if task == "translations" else "transcribe"}
        if language := _text(form, "language"):
            fields["language"] = language
        if prompt := _text(form, "prompt"):
            fields["prompt"] = prompt
        if raw := _text(form, "temperature"):
            try:
                fields["temperature"] = float(raw)
            except ValueError:
                raise errors.InvalidArgument(f"temperature {raw[:20]!r} is not a number", field="temperature") from None
    finally:
        await form.close()
    value = struct_pb2.Value()
    value.struct_value.update(fields)
    return model, value, response_format, granularities


def _text(form: Any, key: str) -> str:
    value = form.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise errors.InvalidArgument(f"{key} must be a text field, not a file", field=key)
    if len(value) > MAX_FIELD_CHARS:
        raise errors.InvalidArgument(f"{key} is {len(value)} characters long; at most {MAX_FIELD_CHARS}", field=key)
    return value.strip()


def _check_model(gw: OpenAiPorts, name: str) -> None:
    gw.require_ready(name)
    config = gw.configs().get(name)
    if config is not None and config.engine not in SPEECH_ENGINES:
        served = sorted(c.name for c in gw.configs().values() if c.engine in SPEECH_ENGINES)
        raise errors.InvalidArgument(
            f"model {name!r} is not a speech-to-text model (speech models: {', '.join(served) or 'none'})", field="model", model=name
        )


# --- response formats ---------------------------------------------------------------------------------
def render(result: dict[str, Any], response_format: str, task: str, granularities: list[str] | None = None) -> tuple[bytes, str]:
    """(body, media type) of a transcript in an OpenAI response_format."""
    text = str(result.get("text", ""))
    duration = float(result.get("duration", 0.0))
    segments = [
        {"id": int(s.get("id", n)), "seek": 0, "start": float(s.get("start", 0.0)), "end": float(s.get("end", 0.0)), "text": str(s.get("text", ""))}
        for n, s in enumerate(result.get("segments") or [])
    ]
    usage = {"type": "duration", "seconds": max(1, round(duration))}
    if response_format == "text":
        return (text + "\n").encode(), "text/plain; charset=utf-8"
    if response_format == "srt":
        return srt(segments).encode(), "text/plain; charset=utf-8"
    if response_format == "vtt":
        return vtt(segments).encode(), "text/vtt; charset=utf-8"
    if response_format == "verbose_json":
        doc: dict[str, Any] = {"task": task, "language": result.get("language", ""), "duration": duration, "text": text}
        if granularities is None or not granularities or "segment" in granularities:
            doc["segments"] = segments
        doc["usage"] = usage
        return orjson.dumps(doc), "application/json"
    return orjson.dumps({"text": text, "usage": usage}), "application/json"


def _clock(seconds: float, separator: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def srt(segments: list[dict[str, Any]]) -> str:
    """SubRip: numbered cues from 1, `HH:MM:SS,mmm --> HH:MM:SS,mmm`, a blank line after each."""
    return "".join(f"{n}\n{_clock(s['start'], ',')} --> {_clock(s['end'], ',')}\n{s['text'].strip()}\n\n" for n, s in enumerate(segments, 1))


def vtt(segments: list[dict[str, Any]]) -> str:
    """WebVTT: the `WEBVTT` header, then `HH:MM:SS.mmm --> HH:MM:SS.mmm` cues."""
    return "WEBVTT\n\n" + "".join(f"{_clock(s['start'], '.')} --> {_clock(s['end'], '.')}\n{s['text'].strip()}\n\n" for s in segments)
