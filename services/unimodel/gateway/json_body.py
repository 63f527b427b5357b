"""The one rule for JSON request bodies, on every route of the gateway.

A body that parses as JSON is JSON, whatever its Content-Type says: `curl -d` labels it
application/x-www-form-urlencoded, some clients send text/plain or nothing. A body that does not parse
is `InvalidArgument("the body is not valid JSON (...)")`, which each route family renders in its own
error shape (UniModel's, OpenAI's, Triton's `{"error": ...}`, ModelCache's errorCode 103): a 400, never
a 500.

Routes therefore read the raw bytes and call `parse`, `parse_object` or `parse_model` here, never a
FastAPI body parameter (FastAPI refuses a JSON body labelled with another Content-Type);
`openapi_body` documents such a body in the OpenAPI document.

Integers go into protobuf fields of fixed width, which raise ValueError on anything wider: every integer
a client sends is range-checked first (`NonNegInt32`, `Int64` in pydantic models; INT32_* / INT64_* where a
route checks by hand), a 400 naming the field and the range.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, TypeVar

import orjson
from pydantic import BaseModel, Field, ValidationError, ValidatorFunctionWrapHandler, WrapValidator
from pydantic_core import PydanticCustomError

from unimodel.core import errors

Raw = bytes | bytearray | memoryview | str
Model = TypeVar("Model", bound=BaseModel)

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_RANGE_ERRORS = frozenset({"greater_than_equal", "less_than_equal", "greater_than", "less_than", "int_parsing_size"})


def _ranged(lo: int, hi: int) -> WrapValidator:
    """pydantic's bound errors as one message naming the whole range."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError as exc:
            if exc.errors()[0]["type"] in _RANGE_ERRORS:
                shown = str(value) if len(str(value)) <= 40 else f"{str(value)[:40]}..."
                raise PydanticCustomError("int_range", f"{shown} is out of range ({lo} to {hi})") from None
            raise

    return WrapValidator(check)


NonNegInt32 = Annotated[int, Field(ge=0, le=INT32_MAX), _ranged(0, INT32_MAX)]
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX), _ranged(INT64_MIN, INT64_MAX)]


# pydantic's names for the member of a union a value failed (`str`, `list[str]`, ...): not fields
_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def parse(raw: Raw, what: str = "the body") -> Any:
    """The JSON value in `raw`; InvalidArgument saying `what` is not valid JSON (and where) otherwise."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise errors.InvalidArgument(f"{what} is not valid JSON ({exc})") from None


def parse_object(raw: Raw, what: str = "the body", example: str = "") -> dict[str, Any]:
    """A JSON object; `example` (e.g. ' like {"input": ...}') completes the message for anything else."""
    data = parse(raw, what)
    if not isinstance(data, dict):
        raise errors.InvalidArgument(f"{what} must be a JSON object{example}")
    return data


def parse_model(raw: Raw, kind: type[Model]) -> Model:
    """A JSON object validated by the pydantic model `kind`; InvalidArgument naming the field at fault."""
    data = parse_object(raw)
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        raise invalid_field(exc) from None


def field_path(loc: Sequence[int | str]) -> str:
    """pydantic's error location as a path a client reads: `messages[0].content` ('body' when empty)."""
    parts = [p for p in loc if not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p))]
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".") or "body"


def invalid_field(exc: ValidationError) -> errors.InvalidArgument:
    """The first validation error as `<field>: <what is wrong>`."""
    details = exc.errors()
    if not details:
        return errors.InvalidArgument("body: invalid value", field="body")
    where = field_path(details[0]["loc"])
    return errors.InvalidArgument(f"{where}: {details[0]['msg']}", field=where)


def openapi_body(
    schema: type[BaseModel] | dict[str, Any], other_media: Mapping[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """`openapi_extra` documenting a JSON request body, plus `other_media` (media type -> its entry) when
    the route takes those too (KServe's binary tensors)."""
    if isinstance(schema, type):
        schema = schema.model_json_schema()
    schema = _inline_defs(schema)
    return {
        "requestBody": {
            "required": True,
            "description": "JSON, read as JSON whatever the Content-Type header says",
            "content": {"application/json": {"schema": schema}, **(other_media or {})},
        }
    }


def _inline_defs(schema: dict[str, Any]) -> dict[str, Any]:
    """pydantic's schema with its `$defs` put in place of each `{"$ref": "#/$defs/<name>"}`: inside an
    OpenAPI document such a reference points at the document's root, where nothing is (fuzzers and client
    generators could not follow it). The request models are not recursive."""
    defs = schema.get("$defs", {})

    def resolve(node: Any, seen: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/") and ref[8:] in defs and ref[8:] not in seen:
                return resolve(defs[ref[8:]], (*seen, ref[8:]))
            return {k: resolve(v, seen) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [resolve(v, seen) for v in node]
        return node

    return dict(resolve(schema, ()))
