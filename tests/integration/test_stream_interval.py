"""The model option `stream_interval` end to end: a cluster (router, batcher, one gpu-worker, gateway) with
SmolLM2 on llama.cpp registered with `stream_interval: 4`; the openai SDK streams the same greedy answer as
the blocking call, in fewer chunks (several tokens each), with its finish_reason and usage."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from helpers.support import Infra, Services
from unimodel.core import modelconfig
from unimodel.local.procs import wait_until

MODEL = "smollm2-135m-instruct"
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory, model_repository: Path) -> Iterator[str]:
    infra = Infra(tmp_path_factory.mktemp("interval"))
    services = Services(infra)
    try:
        infra.start()
        services.start_cluster(1, all_six=False, repository=model_repository, models="")
        options = dict(modelconfig.load(model_repository / MODEL).options)  # registration replaces the whole map
        body = {"name": MODEL, "config": {"options": {**options, "n_threads": "1", "stream_interval": "4"}}}
        r = httpx.post(f"{services.url}/v1/models", json=body, timeout=30)
        assert r.status_code < 300, r.text
        wait_until(
            lambda: httpx.get(f"{services.url}/v1/models/{MODEL}/status", timeout=5).json().get("state") == "READY",
            120, f"{MODEL} ready",
        )
        yield services.url
    finally:
        services.stop()
        infra.stop()


def test_a_stream_interval_sends_the_same_answer_in_fewer_chunks(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Count from one to twenty in words."}]
    asked = {"model": MODEL, "messages": messages, "max_tokens": 21, "temperature": 0, "extra_body": {"ignore_eos": True}}
    whole = client.chat.completions.create(**asked)  # type: ignore[call-overload]  # the SDK's overloads take these
    assert whole.usage is not None and whole.usage.completion_tokens == 21
    chunks = list(client.chat.completions.create(**asked, stream=True, stream_options={"include_usage": True}))  # type: ignore[call-overload]
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(texts) == whole.choices[0].message.content
    assert 1 + 20 // 4 <= len(texts) <= 1 + 20 // 4 + 1  # the first token alone, then 4 tokens a chunk
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 21
