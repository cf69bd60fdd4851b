"""`supermix serve`'s front door: API key, Host and Origin checks, JSON-only POSTs, CORS only when
asked for, security headers everywhere, no external URLs; the CLI refusing to expose the model
without a key. A real uvicorn server with the tiny model and real HTTP."""

from __future__ import annotations

import re

import httpx
import pytest
from click.testing import CliRunner

from test_server import ServerThread, client

openai = pytest.importorskip("openai")

KEY = "s3cret-key"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def backend(tiny_base, tiny_workspace):
    from runtime_python.backends import TorchBackend

    return TorchBackend.load(tiny_base, tiny_workspace["tokenizer"])


@pytest.fixture(scope="module")
def server(backend):
    from runtime_python.server import create_app

    with ServerThread(create_app(backend)) as s:
        yield s


@pytest.fixture(scope="module")
def keyed(backend):
    from runtime_python.server import create_app

    app = create_app(backend, api_key=KEY, allow_hosts=("chat.lan",), allow_origins=("https://app.example",))
    with ServerThread(app) as s:
        yield s


def test_an_api_key_is_required_on_v1_when_set(keyed):
    for key in ("wrong", KEY + "x", ""):
        oc = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=key or "-", max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError) as e:
            oc.chat.completions.create(model="x", **CHAT)
        assert e.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            oc.models.list()
    r = httpx.post(f"{keyed.url}/v1/chat/completions", json=CHAT)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{keyed.url}/v1/passages/x").status_code == 401
    oc = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=KEY, max_retries=0, timeout=30)
    assert oc.chat.completions.create(model="x", **CHAT).choices[0].message.content is not None
    # the page and /health stay open, so the page can load and ask for the key
    assert httpx.get(f"{keyed.url}/").status_code == 200
    assert httpx.get(f"{keyed.url}/health").json()["auth"] is True
    assert 'id="api-key"' in httpx.get(f"{keyed.url}/").text


def test_serve_refuses_a_non_loopback_host_without_a_key(monkeypatch, tmp_path):
    from runtime_python.cli import check_exposure, main

    monkeypatch.delenv("SUPERMIX_API_KEY", raising=False)
    missing = str(tmp_path / "no-model.pth")
    for host in ("0.0.0.0", "192.168.1.20", "::"):
        r = CliRunner().invoke(main, ["serve", "--host", host, "--model", missing])
        assert r.exit_code == 1 and f"refusing to serve on {host} without an API key" in r.output, r.output
        assert "--insecure-no-auth" in r.output
    for args, env in ((["--api-key", KEY], {}), (["--insecure-no-auth"], {}), ([], {"SUPERMIX_API_KEY": KEY})):
        r = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0", "--model", missing, *args], env=env)
        assert r.exit_code == 1 and "refusing" not in r.output and "not found" in r.output, r.output  # got past it
    for host in ("127.0.0.1", "localhost", "::1"):
        check_exposure(host, None, False)  # loopback: no key needed


def test_only_json_posts_are_accepted(server):
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": kind} if kind else {}
        r = httpx.post(f"{server.url}/v1/chat/completions", content=b'{"messages": []}', headers=headers)
        assert r.status_code == 415, (kind, r.text)
        assert r.json()["error"]["code"] == "unsupported_media_type"
    r = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT,
                   headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200


def test_cross_origin_and_foreign_host_requests_are_refused(server):
    for path, method in (("/v1/chat/completions", "POST"), ("/v1/models", "GET"), ("/v1/completions", "POST")):
        r = httpx.request(method, f"{server.url}{path}", json=CHAT, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
        assert "access-control-allow-origin" not in r.headers
    r = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, headers={"Origin": "null"})
    assert r.status_code == 403
    r = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, headers={"Origin": server.url})  # the page
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    r = httpx.options(f"{server.url}/v1/chat/completions",
                      headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 403  # CORS is off by default
    for host in ("evil.example", f"evil.example:{server.port}", "rebind.attacker.test"):
        r = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, headers={"Host": host})
        assert r.status_code == 400 and r.json()["error"]["code"] == "host_not_allowed", host
        assert httpx.get(f"{server.url}/", headers={"Host": host}).status_code == 400
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", "[::1]", "10.0.0.5:8000"):
        assert httpx.get(f"{server.url}/health", headers={"Host": host}).status_code == 200, host


def test_allowed_hosts_and_origins_get_cors(keyed):
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{keyed.url}/health", headers={"Host": "chat.lan:8000"}).status_code == 200
    pre = httpx.options(f"{keyed.url}/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in pre.headers["access-control-allow-headers"]
    r = httpx.post(f"{keyed.url}/v1/chat/completions", json=CHAT, headers={"Origin": "https://app.example", **auth})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    r = httpx.post(f"{keyed.url}/v1/chat/completions", json=CHAT, headers={"Origin": "https://other.example", **auth})
    assert r.status_code == 403


def test_security_headers_and_no_external_urls(server):
    for path in ("/", "/docs", "/health", "/v1/models", "/nothing", "/static/app.js"):
        r = httpx.get(f"{server.url}{path}")
        csp = r.headers.get("content-security-policy", "")
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp, path
        assert r.headers["x-content-type-options"] == "nosniff", path
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"x", headers={"Content-Type": "text/plain"})
    assert "content-security-policy" in r.headers  # refusals too
    docs = httpx.get(f"{server.url}/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text
    for page in (docs.text, httpx.get(f"{server.url}/").text):
        assert not re.search(r"https?://|//cdn|<script>|\bon\w+=", page), page  # no remote or inline script
    assert httpx.get(f"{server.url}/openapi.json").json()["paths"].keys() >= {"/v1/completions",
                                                                              "/v1/chat/completions"}


class BrokenBackend:
    """The tiny model, except that every prompt fails inside the engine: a bug of ours."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def prefill(self, ids):
        raise RuntimeError("boom")


def test_a_bug_is_a_500_in_openai_shape_with_the_headers(backend):
    from runtime_python.server import create_app

    with ServerThread(create_app(BrokenBackend(backend))) as s:
        r = httpx.post(f"{s.url}/v1/chat/completions", json=CHAT, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error" and "boom" in r.text
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert httpx.get(f"{s.url}/health").json()["status"] == "ok"  # the worker lives on


def test_the_page_works_under_its_csp_with_a_key(keyed):
    """Chromium enforces the CSP: the page must run with it, ask for the key, and then chat."""
    from builder.natural_eval import CHROMIUM, FLAGS

    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed")
    from playwright.sync_api import expect, sync_playwright

    console: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        try:
            page = browser.new_page()
            page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
            page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(keyed.url) else r.abort())
            page.goto(f"{keyed.url}/")
            expect(page.locator("#status")).to_contain_text("API key")  # locators: page scripts cannot eval
            assert page.locator("#settings").get_attribute("open") is not None
            page.fill("#max-tokens", "4")  # the tiny model's window is 256 tokens
            page.fill("#api-key", "wrong")
            page.press("#api-key", "Tab")  # change event: stored in sessionStorage
            page.fill("#prompt", "hi")
            page.click("#send")
            page.wait_for_selector(".msg.assistant .error")
            assert "API key" in page.locator(".msg.assistant .error").inner_text()
            page.fill("#api-key", KEY)
            page.press("#api-key", "Tab")
            page.fill("#prompt", "What is a closure?")
            page.click("#send")
            expect(page.locator(".msg.assistant")).to_have_count(2)
            expect(page.locator("#send")).to_be_enabled(timeout=30_000)
            assert page.locator(".msg.assistant").nth(1).locator(".error").count() == 0
            assert page.evaluate("sessionStorage.getItem('supermix-api-key')") == KEY
        finally:
            browser.close()
    assert not [m for m in console if "Content Security Policy" in m], console
