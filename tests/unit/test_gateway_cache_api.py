"""ModelCache's request JSON and OpenAI's embeddings request, translated to the cache and predict calls
(plain functions: no cluster)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from unimodel.core import errors
from unimodel.gateway import json_body
from unimodel.gateway.modelcache import protocol as mc
from unimodel.gateway.openai import embeddings as api_embeddings


def test_modelcache_accepts_a_json_string_body_and_plain_json() -> None:
    data = {"type": "query", "scope": {"model": "m"}, "query": [{"role": "user", "content": "hi"}]}
    assert mc.parse(json.dumps(json.dumps(data)).encode()) == data  # requests.post(json=json.dumps(data))
    assert mc.parse(json.dumps(data).encode()) == data
    request = mc.query_request(data, tenant="team-a")
    assert request.scope.model == "m" and request.scope.tenant == "team-a"
    assert [(m.role, m.content) for m in request.messages] == [("user", "hi")]
    assert mc.query_request({**data, "query": "plain text"}, "").messages[0].content == "plain text"


def test_modelcache_insert_and_remove_requests() -> None:
    data = {
        "type": "insert", "scope": {"model": "m"},
        "chat_info": [{"query": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "answer": "a"}],
    }
    request = mc.insert_request(data, "")
    assert len(request.entries) == 1 and request.entries[0].answer == "a" and len(request.entries[0].messages) == 2
    assert mc.remove_request({"type": "remove", "scope": {"model": "m"}, "remove_type": "truncate_by_model"}, "").truncate
    ids = mc.remove_request({"type": "remove", "scope": {"model": "m"}, "remove_type": "delete_by_id", "id_list": [3, 4]}, "")
    assert list(ids.ids) == [3, 4] and not ids.truncate


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"{", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"type": "drop", "scope": {"model": "m"}}', "type exception"),
        (b'{"type": "query", "scope": {}}', "scope is required"),
        (b'{"type": "query", "scope": {"model": ""}}', "scope is required"),
    ],
)
def test_modelcache_bad_requests(raw: bytes, fragment: str) -> None:
    with pytest.raises(mc.BadRequest, match=fragment):
        mc.parse(raw)


@pytest.mark.parametrize(
    ("fn", "data", "fragment"),
    [
        (mc.query_request, {"scope": {"model": "m"}}, "query is required"),
        (mc.query_request, {"scope": {"model": "m"}, "query": [{"content": "x"}]}, "role"),
        (mc.query_request, {"scope": {"model": "m"}, "query": [{"role": "user", "content": 3}]}, "string"),
        (mc.insert_request, {"scope": {"model": "m"}, "chat_info": [{"query": "q"}]}, "answer"),
        (mc.remove_request, {"scope": {"model": "m"}, "remove_type": "delete_by_id", "id_list": [True]}, "id_list"),
    ],
)
def test_modelcache_bad_fields(fn, data: dict, fragment: str) -> None:
    with pytest.raises(mc.BadRequest, match=fragment):
        fn(data, "")


def _embedding_body(raw: bytes) -> api_embeddings.EmbeddingBody:
    return json_body.parse_model(raw, api_embeddings.EmbeddingBody)


def test_embeddings_request_checks() -> None:
    body = _embedding_body(b'{"model": "e", "input": ["a", "b"]}')
    assert api_embeddings._texts(body) == ["a", "b"]
    for raw, fragment in [
        (b'{"model": "e", "input": []}', "empty"),
        (b'{"model": "e", "input": [[1, 2]]}', "token arrays"),
        (b'{"model": "e", "input": ["ok", ""]}', r"input\[1\] is an empty string"),
    ]:
        with pytest.raises(errors.InvalidArgument, match=fragment):
            api_embeddings._texts(_embedding_body(raw))
    with pytest.raises(errors.InvalidArgument, match="encoding_format"):
        _embedding_body(b'{"model": "e", "input": "x", "encoding_format": "int8"}')


def test_embeddings_response_float_and_base64() -> None:
    vectors = np.array([[0.5, -0.25], [1.0, 2.0]], dtype=np.float32)
    floats = json.loads(api_embeddings.response_body("e", vectors, 7, "float"))
    assert floats["data"][1]["embedding"] == [1.0, 2.0] and floats["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    packed = json.loads(api_embeddings.response_body("e", vectors, 7, "base64"))
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    assert decoded.tolist() == [0.5, -0.25]
