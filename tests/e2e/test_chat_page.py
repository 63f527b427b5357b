"""The chat page (GET /chat) in headless Chromium, against a real cluster serving smollm2-135m-instruct.

The browser is the system Chromium (Debian's `chromium` package, installed by scripts/setup) driven by
playwright; no browser is downloaded. The test is skipped, saying why, only when no Chromium exists.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Request, expect, sync_playwright

from helpers.support import Infra, Services
from unimodel.gateway.chat_page import load_page

MODEL = "smollm2-135m-instruct"
SPEECH_MODEL = "whisper-base"
SPEECH = Path(__file__).resolve().parents[1] / "data" / "speech" / "00.wav"  # espeak-ng: "The quick brown fox ..."
MODEL_MAX_TOKENS = 1024  # the catalog's llm.max_tokens for the model: more is a 400


def chromium() -> str | None:
    """Debian's Chromium (/usr/bin/chromium), else one on PATH."""
    if Path("/usr/bin/chromium").exists():
        return "/usr/bin/chromium"
    return shutil.which("chromium") or shutil.which("chromium-browser")


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        chromium() is None,
        reason="no Chromium binary (/usr/bin/chromium): install Debian's `chromium` package (scripts/setup does as root)",
    ),
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        # a fake microphone that plays an espeak-ng clip (the microphone test); no prompt asks for it
        fake_mic = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={SPEECH}"]
        browser = pw.chromium.launch(executable_path=chromium(), headless=True, args=fake_mic)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_repository: Path) -> Iterator[Services]:
    """One cluster for the module (the fixtures of tests/integration/conftest.py, module-scoped): router,
    batcher, one gpu-worker and the gateway, with the chat model loaded."""
    infra = Infra(tmp_path_factory.mktemp("chat-cluster"))
    try:
        infra.start()
        services = Services(infra)
        try:
            services.start_cluster(all_six=False, repository=model_repository, models=f"{MODEL},{SPEECH_MODEL}")
            yield services
        finally:
            services.stop()
    finally:
        infra.stop()


class ChatPage:
    """The page plus what the browser saw: chat request bodies and headers, failed requests, CSP and
    script errors."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.failed: list[str] = []
        self.problems: list[str] = []
        page.on("request", self._request)
        page.on("requestfailed", lambda r: self.failed.append(f"{r.url} {r.failure}"))
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("console", self._console)

    def _request(self, request: Request) -> None:
        if request.url.endswith("/v1/chat/completions"):
            self.bodies.append(request.post_data_json)
            self.headers.append(request.headers)

    def _console(self, msg: ConsoleMessage) -> None:
        if "Content Security Policy" in msg.text:
            self.problems.append(f"CSP: {msg.text}")

    def settings(self, *, max_tokens: int, temperature: float = 0, system: str = "") -> None:
        self.page.get_by_label("Max tokens").fill(str(max_tokens))
        self.page.get_by_label("Temperature").fill(str(temperature))
        self.page.get_by_label("System prompt").fill(system)

    def send(self, text: str) -> None:
        """Type a message and press Enter (Shift+Enter for the newlines in `text`)."""
        prompt = self.page.get_by_label("Message")
        prompt.click()
        for i, line in enumerate(text.split("\n")):
            if i:
                prompt.press("Shift+Enter")
            prompt.press_sequentially(line)
        expect(prompt).to_have_value(text)
        prompt.press("Enter")

    def replies(self, status: str = "") -> Any:
        sel = '[data-testid="message-assistant"]' + (f'[data-status="{status}"]' if status else "")
        return self.page.locator(sel)

    def wait_idle(self) -> None:
        expect(self.page.get_by_test_id("chat")).to_have_attribute("data-state", "idle", timeout=30_000)

    def history(self) -> list[dict[str, str]]:
        return self.page.evaluate("() => window.UniModelChat.history.map((m) => ({...m}))")


@pytest.fixture
def chat(browser: Browser, cluster: Services) -> Iterator[ChatPage]:
    context = browser.new_context()  # fresh localStorage per test
    page = context.new_page()
    page.set_default_timeout(15_000)
    chat = ChatPage(page)
    try:
        response = page.goto(f"{cluster.url}/chat")
        assert response is not None and response.status == 200
        assert "default-src 'none'" in response.headers["content-security-policy"]
        expect(page.get_by_test_id("chat")).to_have_attribute("data-models", "loaded")
        page.get_by_label("Model", exact=True).select_option(MODEL)
        yield chat
        assert chat.problems == []
    finally:
        context.close()


def test_sse_parser_handles_events_split_anywhere(browser: Browser) -> None:
    """The page's SSE parser gives the same events whatever the read boundaries (CRLF split too)."""
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_content(load_page().decode())  # no server: the model list fails, the parser is there
        stream = (
            ': keep-alive\r\n\r\ndata: {"a": "h\u00e9llo"}\r\n\r\n'
            "data: line one\ndata: line two\n\nevent: x\nid: 3\ndata:no-space\n\n"
            "data: [DONE]\n\ndata: tail-without-blank-line"
        )
        expected = ['{"a": "h\u00e9llo"}', "line one\nline two", "no-space", "[DONE]", "tail-without-blank-line"]
        results = page.evaluate(
            """(stream) => {
                const run = (chunks) => {
                    const events = [];
                    const p = window.UniModelChat.createSseParser((d) => events.push(d));
                    for (const c of chunks) p.push(c);
                    p.end();
                    return events;
                };
                const out = [run([stream])];
                for (let i = 0; i <= stream.length; i++) out.push(run([stream.slice(0, i), stream.slice(i)]));
                for (let size = 1; size <= 7; size++) {
                    const chunks = [];
                    for (let i = 0; i < stream.length; i += size) chunks.push(stream.slice(i, i + size));
                    out.push(run(chunks));
                }
                return out;
            }""",
            stream,
        )
        assert len(results) > len(stream)
        for events in results:
            assert events == expected
    finally:
        context.close()


def test_lists_streams_and_keeps_the_conversation(chat: ChatPage) -> None:
    page = chat.page
    options = page.get_by_label("Model", exact=True).locator("option")
    assert MODEL in options.evaluate_all("(opts) => opts.map((o) => o.value)")
    expect(page.get_by_test_id("model-note")).to_contain_text("ready")

    # The API key is kept in localStorage and sent as a Bearer token (keys are off here: ignored).
    page.get_by_label("API key").fill("sk-chat-test")
    page.reload()
    expect(page.get_by_label("API key")).to_have_value("sk-chat-test")
    expect(page.get_by_label("Model", exact=True)).to_have_value(MODEL)

    # Record the reply's text every time the DOM changes.
    page.evaluate(
        """() => {
            window.__growth = [];
            new MutationObserver(() => {
                const reply = [...document.querySelectorAll('[data-testid="message-assistant"]')].pop();
                if (reply) window.__growth.push({
                    len: reply.querySelector('[data-testid="message-content"]').textContent.length,
                    status: reply.dataset.status,
                });
            }).observe(document.getElementById("log"), { subtree: true, childList: true, characterData: true });
        }"""
    )
    chat.settings(max_tokens=16, system="You are a friendly assistant.")
    chat.send("Say hello.")
    expect(chat.replies("done")).to_have_count(1, timeout=30_000)
    chat.wait_idle()

    first = chat.replies().nth(0)
    final = first.get_by_test_id("message-content").text_content() or ""
    assert final.strip()
    growth = page.evaluate("() => window.__growth")
    partial = [g["len"] for g in growth if g["status"] == "streaming" and g["len"] > 0]
    assert len(partial) >= 2, f"the reply did not stream in several DOM updates: {growth}"
    assert partial == sorted(partial) and partial[0] < len(final), growth

    stats = first.get_by_test_id("reply-stats")
    expect(stats.get_by_test_id("stat-prompt-tokens")).to_have_text(re.compile(r"^prompt \d+$"))
    completion = stats.get_by_test_id("stat-completion-tokens").text_content() or ""
    assert re.fullmatch(r"completion \d+", completion) and 1 <= int(completion.split()[1]) <= 16
    expect(stats.get_by_test_id("stat-ttft")).to_have_text(re.compile(r"^TTFT \d+(\.\d+)? m?s$"))
    expect(stats.get_by_test_id("stat-latency")).to_have_text(re.compile(r"^total \d+(\.\d+)? m?s$"))
    expect(stats.get_by_test_id("stat-tokens-per-second")).to_have_text(re.compile(r"^tok/s \d+(\.\d+)?$"))

    # Second turn (Shift+Enter makes a newline, Enter sends): the whole history goes with it.
    chat.send("Thanks!\nAnd goodbye.")
    expect(chat.replies("done")).to_have_count(2, timeout=30_000)
    chat.wait_idle()
    assert len(chat.bodies) == 2
    first_body, second = chat.bodies
    assert first_body["stream"] is True and first_body["stream_options"] == {"include_usage": True}
    assert first_body["max_tokens"] == 16 and first_body["temperature"] == 0 and first_body["model"] == MODEL
    assert second["messages"] == [
        {"role": "system", "content": "You are a friendly assistant."},
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": final},
        {"role": "user", "content": "Thanks!\nAnd goodbye."},
    ]
    assert all(h.get("authorization") == "Bearer sk-chat-test" for h in chat.headers)


def test_stop_aborts_mid_stream_and_the_page_stays_usable(chat: ChatPage) -> None:
    page = chat.page
    chat.settings(max_tokens=24)
    # Press Stop (a real click on the button) as soon as the first token is on the page.
    page.evaluate(
        """() => {
            const obs = new MutationObserver(() => {
                const reply = document.querySelector('[data-testid="message-assistant"]');
                if (reply && reply.querySelector('[data-testid="message-content"]').textContent) {
                    obs.disconnect();
                    document.getElementById("stop").click();
                }
            });
            obs.observe(document.getElementById("log"), { subtree: true, childList: true, characterData: true });
        }"""
    )
    chat.send("Count from one to fifty in words.")
    expect(chat.replies("stopped")).to_have_count(1)
    chat.wait_idle()
    assert any("/v1/chat/completions" in f and "ERR_ABORTED" in f for f in chat.failed), chat.failed
    stopped = chat.replies().nth(0).get_by_test_id("message-content").text_content() or ""
    assert stopped
    expect(page.get_by_test_id("stop")).to_be_disabled()
    expect(page.get_by_test_id("send")).to_be_enabled()

    # Still usable: the next turn streams, with the stopped partial reply in its history.
    chat.settings(max_tokens=4)
    chat.send("Hi.")
    expect(chat.replies("done")).to_have_count(1, timeout=30_000)
    chat.wait_idle()
    assert chat.bodies[-1]["messages"][-2:] == [
        {"role": "assistant", "content": stopped},
        {"role": "user", "content": "Hi."},
    ]


def test_errors_show_the_openai_error_body(chat: ChatPage) -> None:
    page = chat.page
    chat.settings(max_tokens=MODEL_MAX_TOKENS + 1)
    chat.send("Hello?")
    error = page.get_by_test_id("error")
    expect(error).to_have_count(1)
    expect(error).to_contain_text("HTTP 400")
    expect(error).to_contain_text("max_tokens")
    chat.wait_idle()
    assert chat.history() == []  # the failed turn is not part of the conversation
    expect(page.get_by_label("Message")).to_have_value("Hello?")  # back in the box to retry
    expect(page.get_by_test_id("send")).to_be_enabled()

    # A model the gateway does not know: 404 with OpenAI's body.
    page.get_by_label("Model", exact=True).evaluate(
        """(select) => { const o = document.createElement("option"); o.value = o.textContent = "no-such-model";
                         select.append(o); select.value = "no-such-model"; }"""
    )
    chat.settings(max_tokens=4)
    page.get_by_test_id("send").click()
    expect(error).to_have_count(2)
    expect(error.nth(1)).to_contain_text("HTTP 404")
    expect(error.nth(1)).to_contain_text("no-such-model")
    assert chat.history() == []


def test_says_so_when_no_generative_model_is_listed(chat: ChatPage) -> None:
    """Only generative models are offered; with none, a message and no Send (the list is the cluster's,
    minus its generative entries)."""
    page = chat.page

    def without_generative(route: Any) -> None:
        listed = route.fetch().json()
        listed["data"] = [m for m in listed["data"] if not m.get("generative")]
        route.fulfill(json=listed)

    page.route("**/v1/models", without_generative)
    page.get_by_test_id("refresh-models").click()
    expect(page.get_by_test_id("model-note")).to_contain_text("No generative model")
    expect(page.get_by_label("Model", exact=True).locator("option")).to_have_count(0)
    expect(page.get_by_test_id("send")).to_be_disabled()


def test_microphone_records_transcribes_and_fills_the_message(browser: Browser, cluster: Services) -> None:
    """Chromium's fake microphone plays an espeak-ng clip; Record, then Stop: the page sends a WAV it made to
    /v1/audio/transcriptions and puts the transcript in the message box."""
    context = browser.new_context(permissions=["microphone"])
    try:
        page = context.new_page()
        page.set_default_timeout(30_000)
        chat = ChatPage(page)
        uploads: list[str] = []
        page.on("request", lambda r: uploads.append(r.headers.get("content-type", "")) if r.url.endswith("/v1/audio/transcriptions") else None)
        page.goto(f"{cluster.url}/chat")
        expect(page.get_by_test_id("chat")).to_have_attribute("data-models", "loaded")
        mic = page.get_by_test_id("mic")
        expect(mic).to_be_enabled()
        assert SPEECH_MODEL in (mic.get_attribute("title") or "")
        mic.click()
        expect(page.get_by_test_id("chat")).to_have_attribute("data-mic", "recording")
        page.wait_for_timeout(6_500)  # the clip is 5.2 s; the fake device loops it
        mic.click()
        expect(page.get_by_test_id("chat")).to_have_attribute("data-mic", "idle")
        expect(page.get_by_test_id("mic-status")).to_contain_text("Transcribed")
        text = page.get_by_label("Message").input_value().lower()
        heard = [w for w in ("quick", "brown", "fox", "lazy", "dog", "river") if w in text]
        assert len(heard) >= 3, text
        assert uploads and uploads[0].startswith("multipart/form-data"), uploads
        assert chat.problems == []
    finally:
        context.close()
