"""The Pages site: browser index parity (Python vs JS), `builder site`, and a real chat in headless Chromium.

The browser test serves the built site with `python -m http.server` on 127.0.0.1, drives Debian's
/usr/bin/chromium through the `playwright` package (flags: docs/pages/decisions.md), aborts and records every request
that would leave 127.0.0.1, and compares the streamed reply with runtime_python's onnxruntime reply on
the same ONNX file, token for token. Page state is polled with `page.evaluate` because the page's
Content-Security-Policy (kept on in the test) forbids the string eval `wait_for_function` uses.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from builder.natural_eval import CHROMIUM, FLAGS, serve
from builder.site import SITE_DTYPE

REPO = Path(__file__).resolve().parent.parent
needs_npm = pytest.mark.skipif(not (REPO / "web_static/node_modules/@huggingface/transformers").is_dir(),
                               reason="run `npm ci --ignore-scripts` in web_static")


@pytest.fixture(scope="session")
def tiny_export(tiny_base, tiny_workspace, tiny_index, tmp_path_factory) -> Path:
    """The tiny model exported (ONNX fp32 + q8, GGUF, browser index) through the real export path."""
    from builder.export import export_model

    out = tmp_path_factory.mktemp("export") / "export"
    export_model(tiny_base, tiny_workspace["tokenizer"], out, index_path=tiny_index, version="tiny", gguf=True,
                 log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def site(tiny_export, tmp_path_factory) -> Path:
    from builder.site import build_site

    root = tmp_path_factory.mktemp("site")
    card = root / "card" / "README.md"
    card.parent.mkdir()
    card.write_text("---\nlicense: mit\n---\n# Tiny card\n\nSome **bold** text.\n\n| metric | value |\n|---|---|\n"
                    "| val_bpb | 3.2 |\n\n![loss](loss_curve.png)\n\n<script>alert(1)</script>\n", encoding="utf-8")
    (card.parent / "loss_curve.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    build_site(tiny_export, root / "site", card=card)
    return root / "site"


# ----------------------------------------------------------------------------- builder site

@needs_npm
def test_site_layout(site, tiny_export):
    from builder.site import runtime_settings

    assert (site / ".nojekyll").is_file()
    for f in ("index.html", "model.html", "about.html", "style.css", "site.css", "app.js", "worker.js", "sw.js", "retrieval.js", "prompt.js",
              "vendor/transformers.js", "vendor/ort/ort-wasm-simd-threaded.asyncify.wasm",
              "vendor/ort/ort-wasm-simd-threaded.asyncify.mjs", "models/supermix/onnx/model_quantized.onnx",
              "models/supermix/onnx/model.onnx", "models/supermix/tokenizer.json", "models/supermix/index/meta.json",
              "model-card.md", "loss_curve.png"):
        assert (site / f).is_file(), f
    assert not (site / "models/supermix/model.safetensors").exists() and not (site / "node_modules").exists()
    assert (tiny_export / "gguf/model-f32.gguf").is_file() and not (site / "models/supermix/gguf").exists()
    config = json.loads((site / "site.json").read_text())
    assert {k: config[k] for k in runtime_settings()} == runtime_settings()
    for page in ("index.html", "model.html", "about.html"):
        html = (site / page).read_text()
        assert "Content-Security-Policy" in html and "default-src 'self'" in html
        assert 'src="/' not in html and 'href="/' not in html and "http" not in html.split("<body", 1)[1]


def test_site_without_node_modules(tiny_export, tmp_path):
    from click.testing import CliRunner

    from builder.cli import main
    from builder.site import SiteError, build_site

    bare = tmp_path / "web_static"
    bare.mkdir()
    (bare / "package.json").write_text((REPO / "web_static/package.json").read_text())
    with pytest.raises(SiteError, match="npm ci --ignore-scripts"):
        build_site(tiny_export, tmp_path / "site", web_static=bare)
    result = CliRunner().invoke(main, ["site", "--export", str(tmp_path / "nope"), "--out", str(tmp_path / "s")])
    assert result.exit_code == 1 and "Error:" in result.output and not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------- Chromium

def _reference(export: Path, messages: list[dict], max_new_tokens: int, dtype: str = SITE_DTYPE) -> dict:
    """runtime_python's reply on the same ONNX file and the same browser index: ids, text, sources."""
    import runtime_python.chat as chat
    from source.retrieval import Index
    from runtime_python.generation import GenerationConfig
    from runtime_python.onnx_backend import OnnxBackend

    backend = OnnxBackend(export, dtype=dtype)
    tok = backend.tokenizer
    end = {tok.eos_id, tok.bos_id, *tok.special_ids.values()}
    sampled: list[int] = []
    real = chat.sample_next

    def record(*args, **kwargs):  # generate_stream yields text; the ids are what sample_next returns
        sampled.append(real(*args, **kwargs))
        return sampled[-1]

    chat.sample_next = record
    try:
        reply = list(chat.generate_stream(backend, messages, GenerationConfig(temperature=0, max_new_tokens=max_new_tokens),
                                          index=Index(export / "index")))[-1]
    finally:
        chat.sample_next = real
    return {"token_ids": [i for i in sampled if i not in end], "text": reply.text,
            "sources": [s.id for s in reply.sources], "citations": [c.id for c in reply.citations],
            "prompt_tokens": reply.prompt_tokens, "finish_reason": reply.finish_reason}


LOAD_S = 240.0  # a first load compiles 27 MB of wasm: slow on a busy 2-core machine


def _wait(page, expr: str, timeout: float = 60.0):
    from playwright.sync_api import Error

    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if value := page.evaluate(expr):
                return value
        except Error as e:  # the page reloading itself (sw.js taking over for isolation) mid-evaluate
            if "context was destroyed" not in str(e):
                raise
        time.sleep(0.05)
    raise TimeoutError(f"{expr} after {timeout} s; errors: {page.evaluate('window.supermix?.errors')}")


@pytest.fixture(scope="module")
def server(site):
    with serve(site) as base:
        yield base


@pytest.mark.slow
@needs_npm
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed")
def test_chat_in_chromium(server, tiny_export, tmp_path):
    from playwright.sync_api import sync_playwright

    art = REPO / "artifacts"
    art.mkdir(exist_ok=True)
    external: list[str] = []
    requests: list[str] = []

    def route(r):  # anything not on our server is aborted and recorded
        url = r.request.url
        requests.append(url)
        if url.startswith(server) or url.startswith(("data:", "blob:")):
            return r.continue_()
        external.append(url)
        return r.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        ctx = browser.new_context(viewport={"width": 390, "height": 844})  # a phone
        ctx.route("**/*", route)
        page = ctx.new_page()
        page.goto(server + "?temperature=0&max_new_tokens=24")
        _wait(page, "window.supermix && (window.supermix.ready || window.supermix.errors.length)", LOAD_S)
        assert page.evaluate("window.supermix.errors") == []
        # no ?dtype=: the weights site.json names, shown in the settings
        assert page.evaluate("[window.supermix.dtype, document.getElementById('dtype').value]") == [SITE_DTYPE] * 2
        # sw.js made the page cross-origin isolated (one reload): onnxruntime-web runs a thread per core
        cores = page.evaluate("Math.min(4, navigator.hardwareConcurrency)")
        assert page.evaluate("[crossOriginIsolated, window.supermix.isolated, window.supermix.threads]") == \
            [True, True, cores]
        # --disable-gpu: no WebGPU adapter, so wasm without a probe
        assert page.evaluate("[window.supermix.device, window.supermix.deviceChoice.how]") == ["wasm", "no WebGPU adapter"]

        # two turns, greedy: ids, text and sources equal the Python runtime's (history included)
        messages: list[dict] = []
        for n, prompt in enumerate(["What is a closure?", "And what does closing mean?"], 1):
            page.focus("#prompt")
            page.keyboard.type(prompt)
            page.keyboard.press("Enter")  # keyboard only
            _wait(page, f"window.supermix.replies.length >= {n} || window.supermix.errors.length")
            got = page.evaluate(f"window.supermix.replies[{n - 1}]")
            messages.append({"role": "user", "content": prompt})
            want = _reference(tiny_export, messages, 24)
            assert got["token_ids"] == want["token_ids"] and got["text"] == want["text"]
            assert [s["id"] for s in got["sources"]] == want["sources"] and want["sources"]
            assert [c["id"] for c in got["citations"]] == want["citations"]
            assert (got["prompt_tokens"], got["finish_reason"]) == (want["prompt_tokens"], want["finish_reason"])
            messages.append({"role": "assistant", "content": got["text"]})
            body = page.locator(".msg.assistant .body").nth(n - 1).inner_text()
            assert body.strip() == got["text"].strip()
        assert page.locator(".msg.assistant").nth(1).locator(".sources li").count() == len(got["sources"])

        # citations: a reply citing [2] shows that source, expandable to its passage
        page.evaluate("""window.supermix.renderReply({text: 'It is a closure [2].', completion_tokens: 5,
            tokens_per_second: 1, finish_reason: 'stop', citations: [{number: 2, id: 'a#0', title: 'closure',
            source: 'foldoc', text: 'A closure is a function with its environment.'}], sources: []})""")
        cite = page.locator(".msg.assistant").last.locator(".citations li")
        assert cite.count() == 1 and "[2] closure" in cite.inner_text()
        cite.locator("summary").click()
        assert cite.locator(".passage").is_visible()
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scroll
        page.screenshot(path=str(art / "site-chat-phone.png"), full_page=True)

        # Stop: a long sampled reply (min_new_tokens: it cannot end by itself) ends early with "stop"
        page.goto(server + "?max_new_tokens=100&min_new_tokens=100&seed=1")
        _wait(page, "window.supermix && (window.supermix.ready || window.supermix.errors.length)", LOAD_S)
        page.click("#settings summary")
        page.fill("#max-tokens", "100")  # the tiny model's window is 256 tokens
        page.focus("#temperature")
        page.keyboard.press("End")  # sampled, at the slider's maximum
        assert page.locator("#temperature-out").inner_text() == "2"
        page.fill("#prompt", "Tell me a long story")
        page.click("#send")
        _wait(page, "document.querySelectorAll('.msg.assistant .body')[0].textContent.length > 0")
        page.keyboard.press("Escape")  # = Stop, from the keyboard
        _wait(page, "window.supermix.replies.length >= 1")
        stopped = page.evaluate("window.supermix.replies[0]")
        assert stopped["finish_reason"] == "stop" and stopped["completion_tokens"] < 100

        # New chat clears the conversation
        page.click("#new-chat")
        assert page.locator(".msg").count() == 0

        # second visit: model, wasm and index come from the Cache API, not the network
        before = len(requests)
        assert any(u.endswith("onnx/model.onnx") for u in requests)  # the route sees the worker's fetches
        page.reload()
        _wait(page, "window.supermix && window.supermix.ready", LOAD_S)
        again = [u for u in requests[before:] if u.endswith((".onnx", ".wasm", "tokenizer.json", ".bin"))]
        assert again == [], again
        ctx.set_offline(True)  # third visit, offline: the service worker serves the page, caches the rest
        page.reload()
        _wait(page, "window.supermix && window.supermix.ready", LOAD_S)
        ctx.set_offline(False)

        # int8 weights (?dtype=q8): the same equality on onnx/model_quantized.onnx (the tiny model's int8
        # greedy tokens agree between wasm and native; the champion's do not always: decisions.md)
        page.goto(server + "?dtype=q8&temperature=0&max_new_tokens=24&nosw=1")
        _wait(page, "window.supermix && window.supermix.ready", LOAD_S)
        page.fill("#prompt", "What is a closure?")
        page.press("#prompt", "Enter")
        _wait(page, "window.supermix.replies.length >= 1")
        got = page.evaluate("window.supermix.replies[0]")
        want = _reference(tiny_export, [{"role": "user", "content": "What is a closure?"}], 24, dtype="q8")
        assert (got["token_ids"], got["text"]) == (want["token_ids"], want["text"])
        assert any(u.endswith("model_quantized.onnx") for u in requests)
        assert page.evaluate("[window.supermix.dtype, document.getElementById('dtype').value]") == ["q8", "q8"]

        # where no service worker can run, the page is not isolated and runs one thread, same tokens
        bare = browser.new_context(service_workers="block")
        bare.route("**/*", route)
        single = bare.new_page()
        single.goto(server + "?temperature=0&max_new_tokens=24")
        _wait(single, "window.supermix && (window.supermix.ready || window.supermix.errors.length)", LOAD_S)
        assert single.evaluate("[crossOriginIsolated, window.supermix.isolated, window.supermix.threads]") == \
            [False, False, 1]
        single.fill("#prompt", "What is a closure?")
        single.press("#prompt", "Enter")
        _wait(single, "window.supermix.replies.length >= 1")
        got = single.evaluate("window.supermix.replies[0]")
        want = _reference(tiny_export, [{"role": "user", "content": "What is a closure?"}], 24)
        assert (got["token_ids"], got["text"]) == (want["token_ids"], want["text"])
        single.goto(server + "about.html")
        _wait(single, "document.getElementById('doc').textContent.includes('This browser')")
        assert "Not cross-origin isolated" in single.locator("#doc").inner_text()
        bare.close()

        # model card and about pages render from the shipped files, markup escaped
        page.goto(server + "model.html")
        _wait(page, "document.querySelector('#doc table')")
        assert page.locator("#doc h1").inner_text() == "Tiny card" and page.locator("#doc script").count() == 0
        page.goto(server + "about.html")
        _wait(page, "document.getElementById('doc').textContent.includes('Retrieval index')")
        assert "tiny" in page.locator("#doc h1").inner_text() and "passages" in page.locator("#doc").inner_text()
        assert f"wasm runs on {cores} thread" in page.locator("#doc").inner_text()  # controlled: isolated
        assert "No WebGPU here" in page.locator("#doc").inner_text()
        page.screenshot(path=str(art / "site-about.png"), full_page=True)
        browser.close()
    assert external == []


@needs_npm
@pytest.mark.slow
def test_webgpu_probe_in_chromium(server, tiny_export):
    """With a WebGPU adapter (headless Chromium's SwiftShader one) the first load times both devices and keeps
    the faster, a reload takes the remembered choice without probing, and a reply forced onto WebGPU gives
    the Python runtime's greedy tokens."""
    from playwright.sync_api import sync_playwright

    flags = [f for f in FLAGS if f != "--disable-gpu"] + ["--enable-unsafe-webgpu"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=flags)
        page = browser.new_page()
        page.goto(server + "?temperature=0&max_new_tokens=8")
        _wait(page, "window.supermix && (window.supermix.ready || window.supermix.errors.length)", LOAD_S)
        assert page.evaluate("window.supermix.errors") == []
        if not page.evaluate("navigator.gpu ? navigator.gpu.requestAdapter().then((a) => !!a) : false"):
            browser.close()
            pytest.skip("this Chromium offers no WebGPU adapter, not even SwiftShader's")
        choice = page.evaluate("window.supermix.deviceChoice")
        assert choice["how"] == "probe" and choice["wasm_ms"] > 0 and choice["webgpu_ms"] > 0, choice
        assert choice["device"] == ("webgpu" if choice["webgpu_ms"] < choice["wasm_ms"] else "wasm")
        assert page.evaluate("window.supermix.device") == choice["device"]
        assert page.evaluate("window.supermix.loadSteps.probe") > 0
        page.goto(server + "about.html")
        _wait(page, "document.getElementById('doc').textContent.includes('This browser')")
        assert "measured on the first load" in page.locator("#doc").inner_text()

        page.goto(server + "?temperature=0&max_new_tokens=8")
        _wait(page, "window.supermix && window.supermix.ready", LOAD_S)
        again = page.evaluate("window.supermix.deviceChoice")
        assert again["how"] == "remembered" and again["device"] == choice["device"]
        assert "probe" not in page.evaluate("window.supermix.loadSteps")

        page.goto(server + "?device=webgpu&temperature=0&max_new_tokens=8")
        _wait(page, "window.supermix && (window.supermix.ready || window.supermix.errors.length)", LOAD_S)
        assert page.evaluate("[window.supermix.device, window.supermix.deviceChoice.how]") == ["webgpu", "asked"]
        page.fill("#prompt", "hi")
        page.press("#prompt", "Enter")
        _wait(page, "window.supermix.replies.length >= 1 || window.supermix.errors.length", LOAD_S)
        got = page.evaluate("window.supermix.replies[0]")
        want = _reference(tiny_export, [{"role": "user", "content": "hi"}], 8)
        assert (got["token_ids"], got["text"]) == (want["token_ids"], want["text"])
        browser.close()
