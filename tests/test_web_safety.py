"""Hostile text on the published pages: from the registry to the browser it stays text, and every page
carries a Content-Security-Policy that runs no script it did not ship.

The chain is the release's: `builder models add --notes` and `promote`, an eval.json whose samples
carry the markup the corpus teaches the model to copy, `builder card`, `builder site --card` and
`builder docs --card`, with the docs under the site's docs/ folder as dist/pages/ lays them out. The
pages are opened in headless Chromium (the flags of builder/natural_eval.py) from `python -m
http.server`; every payload announces itself by requesting a URL containing "pwned" and by setting
`window.pwned`, and the test watches for both.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from builder.cli import main
from builder.natural_eval import CHROMIUM, FLAGS

REPO = Path(__file__).resolve().parent.parent
needs_npm = pytest.mark.skipif(not (REPO / "web_static/node_modules/@huggingface/transformers").is_dir(),
                               reason="run `npm ci --ignore-scripts` in web_static")


def payload(where: str) -> str:
    js = f"window.pwned='{where}';fetch('/pwned-{where}')"
    return (f'<img src=x onerror="{js}"> <script>{js}</script> [click](javascript:{js}) '
            f'*hover*{{: tabindex=0 autofocus onfocus=fetch(/pwned-attr-{where}/.source) }}')


NOTES = payload("notes")
SAMPLE = {"prompt": payload("prompt"), "answer": f"It is {payload('answer')} [1].\n<svg onload=\"{payload('svg')}\">",
          "sources": [payload("source")]}


def _cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def dist(tiny_base, tiny_workspace, tiny_export, tmp_path_factory) -> Path:
    """The published folder: the site at the root, the docs under docs/, built from a hostile registry."""
    from builder.site import build_site

    root = tmp_path_factory.mktemp("hostile")
    models = str(root / "models")
    _cli("models", "--root", models, "add", str(tiny_base), "--tokenizer", str(tiny_workspace["tokenizer"]),
         "--notes", NOTES)
    _cli("models", "--root", models, "promote", "v1")
    (root / "models/versions/v1/eval.json").write_text(json.dumps({"samples": [SAMPLE]}))
    card = root / "card" / "README.md"
    _cli("card", "--root", models, "--out", str(card), "--dataset-manifest",
         str(REPO / "datasets/manifests/default.json"))
    pages = root / "pages"
    build_site(tiny_export, pages, card=card)
    _cli("docs", "--out", str(pages / "docs"), "--card", str(card))
    return pages


def _policy(html: str) -> str | None:
    m = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)"', html)
    return m.group(1) if m else None


def _sha256(body: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"


@needs_npm
def test_every_page_has_a_policy_that_runs_only_shipped_scripts(dist):
    pages = [*dist.rglob("*.html"), *(REPO / "runtime_python/static").glob("*.html")]
    assert len([p for p in pages if "docs" in p.parts]) >= 10 and (dist / "model.html") in pages
    for page in pages:
        html = page.read_text(encoding="utf-8")
        policy = _policy(html)
        assert policy, f"{page}: no Content-Security-Policy"
        assert html.index("Content-Security-Policy") < html.find("<script") or "<script" not in html, page
        rules = {d.split()[0]: d.split()[1:] for d in policy.split(";") if d.strip()}
        assert rules["default-src"] == ["'self'"] and rules["object-src"] == ["'none'"], page
        scripts = rules["script-src"]
        assert scripts[0] == "'self'" and all(s.startswith("'sha256-") or s == "'wasm-unsafe-eval'"
                                              for s in scripts[1:]), (page, scripts)  # no unsafe-inline, no hosts
        for body in re.findall(r"<script(?![^>]*\bsrc=)(?![^>]*application/json)[^>]*>(.*?)</script>", html, re.S):
            assert _sha256(body) in scripts, f"{page}: an inline script the policy does not allow"


@pytest.fixture(scope="module")
def server(dist):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "-d", str(dist)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.kill()
        proc.wait()


@needs_npm
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")
def test_hostile_registry_and_model_text_stays_text_in_the_browser(dist, server):
    from playwright.sync_api import sync_playwright

    # a copy of the card page with the payload pasted into its HTML, as if escaping had been bypassed:
    # the policy alone must stop it
    card_html = (dist / "docs/model-card.html").read_text(encoding="utf-8")
    bypassed = dist / "docs/bypassed.html"  # removed afterwards: it is no page of the build
    bypassed.write_text(card_html.replace("</article>", payload("bypass") + "</article>"))
    pwned, refused = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        page = browser.new_page()
        page.on("request", lambda r: pwned.append(r.url) if "pwned" in r.url else None)
        page.on("console", lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None)
        for url, text_of in (("docs/model-card.html", "article"), ("model.html", "#doc")):
            page.goto(server + url)
            page.wait_for_selector(f"{text_of} blockquote")
            page.wait_for_timeout(300)  # an onerror fires after the failed image load
            assert page.evaluate("window.pwned === undefined") and pwned == [], (url, pwned)  # no payload ran
            text = page.locator(text_of).inner_text()
            for where in ("notes", "prompt", "answer", "source"):
                assert f"<img src=x onerror=\"window.pwned='{where}'" in text, (url, where)  # shown as typed
                assert f"<script>window.pwned='{where}'" in text, (url, where)
            assert page.locator(f"{text_of} script, {text_of} img[onerror], {text_of} svg").count() == 0, url
            assert page.locator(f"{text_of} a[href^='javascript']").count() == 0, url
            assert page.evaluate(f"[...document.querySelectorAll('{text_of} *')].every(e => "
                                 "[...e.attributes].every(a => !a.name.startsWith('on')))"), url
        assert refused == [], refused  # the docs theme and the site run under their policies as shipped
        page.goto(server + "docs/bypassed.html")
        page.wait_for_timeout(500)
        assert page.evaluate("window.pwned === undefined") and page.locator("article script").count() == 1
        assert any("inline script" in m or "inline event handler" in m for m in refused), refused
        browser.close()
    bypassed.unlink()
    assert pwned == []
