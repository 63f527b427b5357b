"""The doc examples that tests/e2e/test_docs.py runs: how they are read from the Markdown."""

from __future__ import annotations

from helpers import docexamples
from helpers.docexamples import Example, all_examples, examples, with_ports


def test_every_not_run_entry_matches_an_example_and_the_rest_run() -> None:
    found = all_examples()
    for prefix in docexamples.NOT_RUN:
        assert any(ex.text.startswith(prefix) for ex in found), f"NOT_RUN {prefix!r} matches no example"
    runnable = [ex for ex in found if ex.not_run_reason() is None]
    assert len(runnable) >= 20
    assert {"README.md", "docs/api.md"} <= {ex.doc for ex in runnable}
    assert any(ex.lang == "python" for ex in runnable)


def test_a_command_goes_on_while_a_quote_is_open_or_a_line_ends_with_a_backslash() -> None:
    readme = examples("README.md")
    chat = next(ex for ex in readme if '"max_tokens": 32' in ex.text)
    assert chat.text.startswith("curl -s localhost:8000/v1/chat/completions") and chat.text.count("\n") == 1
    photo = next(ex for ex in readme if "photo.jpg" in ex.text)
    assert photo.text.rstrip().endswith("-d @-") and "\\\n" in photo.text
    assert not any(ex.text.lstrip().startswith("#") for ex in readme)


def test_documented_failures_carry_their_status_and_code() -> None:
    failing = [ex for ex in all_examples() if ex.expect_status is not None]
    assert failing, "the README shows at least one error"
    assert all(ex.expect_status >= 400 and ex.expect_code.isupper() for ex in failing)


def test_only_the_default_ports_of_local_addresses_change() -> None:
    ports = {8000: 18000, 8001: 18001, 2379: 12379}
    text = 'curl localhost:8000/x; c("127.0.0.1:8001"); etcd:2379 localhost:80001 127.0.0.1:9000'
    assert with_ports(text, ports) == 'curl localhost:18000/x; c("127.0.0.1:18001"); etcd:2379 localhost:80001 127.0.0.1:9000'


def test_python_blocks_are_one_example() -> None:
    (snippet,) = [ex for ex in examples("docs/api.md") if ex.lang == "python"]
    assert isinstance(snippet, Example) and "from openai import OpenAI" in snippet.text and snippet.line > 1


def test_the_readme_settings_file_is_read_by_every_service(tmp_path) -> None:
    from unimodel.core.settings import all_service_settings, load_settings

    (block,) = docexamples.yaml_blocks("README.md")
    config = tmp_path / "unimodel.yaml"
    config.write_text(block)
    services = all_service_settings()
    assert len(services) >= 6
    for cls in services.values():
        settings = load_settings(cls, ["--config", str(config)])
        assert settings.lease_ttl_s == 10 and settings.nats_url == "nats://127.0.0.1:4222"
