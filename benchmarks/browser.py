"""The chat site in headless Chromium: first load, cached load and decode speed, next to Python onnxruntime.

    python benchmarks/browser.py --export dist/export [--dtype q8,fp32] [--new-tokens 128]
    python benchmarks/browser.py --export dist/export --dtype fp32 --threads 1 --device auto --webgpu   # the probe

Builds the site from the export (`builder site`) into a temporary folder, serves it with
`python -m http.server` on 127.0.0.1 and drives /usr/bin/chromium (flags: docs/pages/decisions.md) with playwright.
Per dtype and thread mode (`--threads 1,auto`: `?threads=1`, or as many as the page gets once sw.js has
made it cross-origin isolated), in a fresh browser context (empty cache):
- first load: page open -> model ready (downloads the wasm, the model and the index start, compiles)
- cached load: a reload in the same context -> ready again (everything from the Cache API)
- one greedy reply of exactly --new-tokens tokens (end tokens suppressed until then, min_new_tokens),
  with retrieval on: prefill ms, decode tokens/s (first to last token), mean forward ms.
Python ORT runs `OnnxBackend` on the same ONNX file with the browser's prompt ids and the same end-token
suppression: its prefill, its decode tokens/s, and whether the greedy tokens are identical.
`--device` sets the page's `?device=` (wasm by default, so the figures are wasm's); `--webgpu` lets Chromium
offer WebGPU, and with `--device auto` the first load runs the page's device probe, whose timings are in the
device column. The load average is printed: a training job on the machine makes every number low and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script from anywhere

from builder.natural_eval import FLAGS, serve  # noqa: E402  (one list of Chromium flags, one static server)

PROMPT = "What does json.dumps do?"


def wait(page, expr: str, timeout: float = 300.0) -> None:
    from playwright.sync_api import Error

    t0 = time.time()
    while time.time() - t0 < timeout:  # polled: the page's CSP forbids wait_for_function's eval
        try:
            if page.evaluate(expr):
                return
        except Error as e:  # sw.js reloading a first visit to make it cross-origin isolated
            if "context was destroyed" not in str(e):
                raise
        time.sleep(0.02)
    raise TimeoutError(f"{expr}: {page.evaluate('window.supermix && window.supermix.errors')}")


def python_ort(export: Path, dtype: str, prompt_ids: list[int], n: int) -> dict:
    """OnnxBackend greedy over the browser's prompt, end tokens masked for the first n tokens."""
    from runtime_python.onnx_backend import OnnxBackend

    backend = OnnxBackend(export, dtype=dtype, threads=1)
    tok = backend.tokenizer
    end = sorted({tok.eos_id, tok.bos_id, *tok.special_ids.values()})
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        logits = backend.prefill(prompt_ids)
        t1 = time.perf_counter()
        out = []
        for i in range(n):
            logits = logits.float().clone()
            logits[end] = float("-inf")
            out.append(int(logits.argmax()))
            if i + 1 < n:
                logits = backend.decode(out[-1])
        t2 = time.perf_counter()
        runs.append((t1 - t0, t2 - t1, out))
    prefill, decode, ids = min(runs, key=lambda r: r[1])
    return {"prefill_ms": prefill * 1000, "decode_tok_s": (n - 1) / decode, "ids": ids}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", type=Path, required=True, help="a `builder export` folder (with index/ for retrieval)")
    ap.add_argument("--dtype", default="q8,fp32")
    ap.add_argument("--threads", default="1,auto", help="thread modes: 1 (?threads=1), auto (isolated page)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--device", choices=["auto", "wasm", "webgpu"], default="wasm",
                    help="?device= for the page; auto: none, so the first load probes (with --webgpu)")
    ap.add_argument("--webgpu", action="store_true",
                    help="let Chromium offer WebGPU (headless: SwiftShader's software adapter); implied by --device webgpu")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from builder.site import build_site

    tmp = Path(tempfile.mkdtemp(prefix="supermix-browser-bench-"))
    site = tmp / "site"
    build_site(args.export, site)
    rows = []
    with serve(site) as base:
        with sync_playwright() as p:
            gpu = args.webgpu or args.device == "webgpu"
            flags = [f for f in FLAGS if f != "--disable-gpu"] + ["--enable-unsafe-webgpu"] if gpu else FLAGS
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=flags)
            for dtype, mode in [(d, t) for d in args.dtype.split(",") for t in args.threads.split(",")]:
                ctx = browser.new_context()
                external = []
                ctx.route("**/*", lambda r: r.continue_() if r.request.url.startswith(base)
                          else (external.append(r.request.url), r.abort()))
                page = ctx.new_page()
                url = (f"{base}?dtype={dtype}&temperature=0&max_new_tokens={args.new_tokens}"
                       f"&min_new_tokens={args.new_tokens}" + ("&threads=1" if mode == "1" else "")
                       + (f"&device={args.device}" if args.device != "auto" else ""))
                t0 = time.perf_counter()
                page.goto(url)
                wait(page, "window.supermix && window.supermix.ready")
                first = time.perf_counter() - t0
                t0 = time.perf_counter()
                page.reload()
                wait(page, "window.supermix && window.supermix.ready")
                cached = time.perf_counter() - t0
                replies = []
                for _ in range(2):  # the first reply also fetches index shards and warms the kernels
                    page.click("#new-chat")  # the same one-turn prompt both times
                    page.fill("#prompt", args.prompt)
                    page.press("#prompt", "Enter")
                    wait(page, f"window.supermix.replies.length > {len(replies)}")
                    replies.append(page.evaluate(f"window.supermix.replies[{len(replies)}]"))
                r = replies[-1]
                py = python_ort(args.export, dtype, r["prompt_ids"], args.new_tokens)
                threads, isolated, choice = page.evaluate(
                    "[window.supermix.threads, window.supermix.isolated, window.supermix.deviceChoice]")
                probe = f" (probe: wasm {choice['wasm_ms']} / webgpu {choice['webgpu_ms']} ms)" if "wasm_ms" in choice else ""
                rows.append({"dtype": dtype, "device": choice["device"] + probe, "threads": threads, "isolated": isolated,
                             "first_load_s": round(first, 2), "cached_load_s": round(cached, 2),
                             "prompt_tokens": r["prompt_tokens"], "new_tokens": r["completion_tokens"],
                             "browser_prefill_ms": round(r["forward_ms"][0], 1),
                             "browser_decode_tok_s": round(r["decode_tokens_per_second"], 1),
                             "browser_forward_ms_mean": round(statistics.mean(r["forward_ms"][1:]), 2),
                             "python_prefill_ms": round(py["prefill_ms"], 1),
                             "python_decode_tok_s": round(py["decode_tok_s"], 1),
                             "same_tokens": py["ids"] == r["token_ids"], "external_requests": len(external)})
                ctx.close()
            browser.close()
    manifest = json.loads((args.export / "manifest.json").read_text()) if (args.export / "manifest.json").exists() else {}
    print(f"export {args.export} (model {manifest.get('model_version')}, {manifest.get('params', 0) / 1e6:.1f}M params); "
          f"Chromium headless; load average {os.getloadavg()[0]:.2f}")
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
