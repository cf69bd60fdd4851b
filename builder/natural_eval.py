"""The natural questions through the paths users run: torch (`supermix ask`), onnx (int8), the site in Chromium.

Design choices:
- Every path answers with its own retrieval, prompt and decoding loop, greedy (temperature 0), and
  hands `source.natural_eval.score_item` what a user would have seen: reply text, cited passage ids,
  the passages shown. Nothing here builds a prompt.
- torch: `TorchBackend` over the .pth (fp32, CPU) + `runtime_python.chat.generate_stream` + the
  retrieval index: what `supermix ask -t 0` does.
- onnx: `OnnxBackend` over the export's ONNX file the site ships (`builder.site.SITE_DTYPE`, or `dtype`)
  + the same `generate_stream`, searching the export's copy of the index (the files the site
  serves), so onnx vs site isolates the runtime (onnxruntime vs onnxruntime-web + transformers.js).
- site: the built site folder served by `python -m http.server` on 127.0.0.1, opened in
  /usr/bin/chromium (docs/pages/decisions.md flags) at `?temperature=0&max_new_tokens=N&nosw=1`. Each item starts a
  conversation with its history through `window.supermix.startConversation(turns)` (web_static/app.js:
  a hook for tests and evaluation), then the question is typed into the page and sent with Enter; the
  reply, its citations and the shown sources are read from `window.supermix.replies`. Every request
  that would leave 127.0.0.1 is aborted and counted (`external_requests`, should be 0).
- A follow-up's history is given to every path the same way (earlier turns as messages), so the
  paths differ only in what they are meant to differ in.
- A path either answers every item or stops the run with an `EvalSetupError` (e.g. a prompt that
  cannot fit the window with --max-new-tokens): a failure is never scored as a wrong answer.

The report (`evaluate_natural`): questions file + sha256, item counts, selection (limit / sample +
seed), max_new_tokens; per path under `paths`: what ran (model or ONNX file + sha256, backend,
retrieval; the site's load time and `external_requests`), `seconds`, `seconds_per_item`, `metrics`
({"overall", "by_kind"} from `source.natural_eval.aggregate`) and `items` (id, kind, question, reply,
cited passage ids, shown passage ids, finish_reason, token counts, seconds, score); with several
paths, `agreement` per pair (share of identical replies, ids that differ).
"""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from builder.site import SITE_DTYPE, onnx_file
from source.files import sha256_file
from source.natural_eval import METRICS, aggregate, agreement, load_items, score_item

PATHS = ("torch", "onnx", "site")

CHROMIUM = Path("/usr/bin/chromium")
# headless Chromium's flags for the site (docs/pages/decisions.md); tests/test_site.py and
# benchmarks/browser.py launch it with these too
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]
SITE_LOAD_TIMEOUT_S = 600.0
SITE_REPLY_TIMEOUT_S = 600.0


class EvalSetupError(Exception):
    """A missing or unusable input (model, export, site, index, browser); the message says what to run."""


def parse_via(via: str) -> list[str]:
    names = list(dict.fromkeys(v.strip() for v in via.split(",") if v.strip()))
    bad = [v for v in names if v not in PATHS]
    if bad or not names:
        raise EvalSetupError(f"--via takes a comma-separated list of {', '.join(PATHS)}, got {via!r}")
    return names


def select_items(items: list[dict], limit: int | None = None, sample: int | None = None, seed: int = 0) -> list[dict]:
    """The first `limit` items, or a seeded random sample of `sample` items kept in file order."""
    if limit is not None and sample is not None:
        raise EvalSetupError("use --limit or --sample, not both")
    if sample is not None and sample < len(items):
        keep = set(random.Random(seed).sample(range(len(items)), sample))
        return [it for i, it in enumerate(items) if i in keep]
    return items[:limit] if limit is not None else list(items)


def messages_of(item: dict) -> list[dict]:
    return [*({"role": t["role"], "content": t["content"]} for t in item["history"]),
            {"role": "user", "content": item["question"]}]


# ----------------------------------------------------------------------------- torch and onnx: runtime_python

def run_engine(backend, index, items: list[dict], max_new_tokens: int, desc: str, progress: bool = True) -> list[dict]:
    """Greedy replies through runtime_python.chat.generate_stream (the engine `supermix` runs)."""
    from tqdm import tqdm

    from runtime_python.chat import Reply, generate_stream
    from runtime_python.generation import GenerationConfig

    gen = GenerationConfig(temperature=0, max_new_tokens=max_new_tokens)
    out = []
    for item in tqdm(items, desc=desc, unit="q", disable=not progress):
        t0 = time.perf_counter()
        try:
            reply = [r for r in generate_stream(backend, messages_of(item), gen, index=index,
                                                retrieval=index is not None) if isinstance(r, Reply)][-1]
        except ValueError as e:  # the prompt cannot fit (max_new_tokens too large for the window)
            raise EvalSetupError(f"{item['id']}: {e}") from None
        out.append({"reply": reply.text, "citations": [c.id for c in reply.citations],
                    "shown": [{"id": s.id, "text": s.text} for s in reply.sources],
                    "finish_reason": reply.finish_reason, "prompt_tokens": reply.prompt_tokens,
                    "completion_tokens": reply.completion_tokens, "seconds": round(time.perf_counter() - t0, 3)})
    return out


def _index(index_path: Path):
    from source.retrieval import Index

    if not (Path(index_path) / "meta.json").is_file():
        raise EvalSetupError(f"retrieval index {index_path} not found: build one with `builder index build` "
                             "or pass --index")
    try:
        return Index(index_path)
    except ValueError as e:
        raise EvalSetupError(str(e)) from None


def torch_path(model_spec: str | None, root: Path, tokenizer_dir: Path | None, index_path: Path, items: list[dict],
               max_new_tokens: int, progress: bool = True) -> dict:
    from runtime_python.backends import TorchBackend, resolve_model

    try:
        pth, tok_dir = resolve_model(model_spec, root, tokenizer_dir)
        backend = TorchBackend.load(pth, tok_dir)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        raise EvalSetupError(str(e).strip("'\"")) from None
    index = _index(index_path)
    info = {"model": str(pth), "model_sha256": sha256_file(pth), "tokenizer": str(tok_dir), "backend": "torch fp32 cpu",
            "retrieval": str(index_path)}
    try:
        return {**info, "results": run_engine(backend, index, items, max_new_tokens, "torch", progress)}
    finally:
        backend.release()


def onnx_path(export_dir: Path, items: list[dict], max_new_tokens: int,
              progress: bool = True, dtype: str = SITE_DTYPE) -> dict:
    from runtime_python.onnx_backend import OnnxBackend

    weights = export_dir / onnx_file(dtype)
    if not weights.is_file() or not (export_dir / "config.json").is_file():
        raise EvalSetupError(f"{export_dir} is not an export folder with {onnx_file(dtype)}: run "
                             f"`builder export --out {export_dir}` or pass --export DIR")
    where = export_dir / "index"
    index = _index(where)
    try:
        backend = OnnxBackend(export_dir, dtype)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise EvalSetupError(str(e)) from None
    manifest = _read_json(export_dir / "manifest.json")
    info = {"export": str(export_dir), "onnx_file": onnx_file(dtype), "onnx_sha256": sha256_file(weights),
            "model_version": manifest.get("model_version"), "source_checkpoint": manifest.get("source_checkpoint"),
            "backend": f"onnxruntime {dtype} cpu", "retrieval": str(where)}
    try:
        return {**info, "results": run_engine(backend, index, items, max_new_tokens, "onnx", progress)}
    finally:
        backend.release()


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------- site: Chromium

@contextmanager
def serve(folder: Path) -> Iterator[str]:
    """`python -m http.server` on a free 127.0.0.1 port; yields the base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "-d", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None:
                    raise EvalSetupError(f"python -m http.server exited with code {proc.returncode}") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _wait(page, expr: str, timeout: float):
    """Poll `expr` in the page (the page's CSP forbids the string eval wait_for_function uses)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if value := page.evaluate(expr):
            return value
        time.sleep(0.05)
    raise EvalSetupError(f"the site did not answer within {timeout:.0f} s ({expr}); "
                         f"page errors: {page.evaluate('window.supermix && window.supermix.errors')}")


def site_path(site_dir: Path, items: list[dict], max_new_tokens: int, progress: bool = True,
              chromium: Path = CHROMIUM, dtype: str = SITE_DTYPE) -> dict:
    from tqdm import tqdm

    model = site_dir / "models" / "supermix" / onnx_file(dtype)
    if not (site_dir / "index.html").is_file() or not (site_dir / "site.json").is_file() or not model.is_file():
        raise EvalSetupError(f"{site_dir} is not a built site (index.html, site.json, models/supermix/{onnx_file(dtype)}): "
                             f"run `builder site --out {site_dir}` or pass --site DIR")
    if not Path(chromium).is_file():
        raise EvalSetupError(f"{chromium} not found: install Debian's chromium (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise EvalSetupError("the playwright package is missing: pip install playwright "
                             "(its browser download is not needed)") from None
    config = _read_json(site_dir / "site.json")
    info = {"site": str(site_dir), "onnx_file": f"models/supermix/{onnx_file(dtype)}", "onnx_sha256": sha256_file(model),
            "model_version": config.get("model_version"), "cache_key": config.get("cache_key"),
            "backend": f"chromium onnxruntime-web wasm {dtype}", "retrieval": "site index (web_static/retrieval.js)"}
    external: list[str] = []
    results = []
    with serve(site_dir) as base, sync_playwright() as p:
        def route(r):  # anything not on our server is aborted and recorded
            url = r.request.url
            if url.startswith(base) or url.startswith(("data:", "blob:")):
                return r.continue_()
            external.append(url)
            return r.abort()

        browser = p.chromium.launch(executable_path=str(chromium), headless=True, args=FLAGS)
        try:
            ctx = browser.new_context(service_workers="block")
            ctx.route("**/*", route)
            page = ctx.new_page()
            t0 = time.perf_counter()
            page.goto(f"{base}?temperature=0&max_new_tokens={max_new_tokens}&nosw=1&dtype={dtype}")
            # ready, or the page's own "Could not load the model" (a warning such as "retrieval off" is not fatal)
            _wait(page, "window.supermix && (window.supermix.ready || "
                        "document.getElementById('progress-label').textContent.startsWith('Could not load'))",
                  SITE_LOAD_TIMEOUT_S)
            errors = page.evaluate("window.supermix.errors")
            if not page.evaluate("window.supermix.ready"):
                raise EvalSetupError(f"the site failed to load the model: {'; '.join(map(str, errors))}")
            info["load_warnings"] = errors  # e.g. "retrieval off: ..." when the index could not load
            info["load_seconds"] = round(time.perf_counter() - t0, 2)
            for item in tqdm(items, desc="site", unit="q", disable=not progress):
                t0 = time.perf_counter()
                page.evaluate("turns => window.supermix.startConversation(turns)", messages_of(item)[:-1])
                n, n_err = page.evaluate("[window.supermix.replies.length, window.supermix.errors.length]")
                page.fill("#prompt", item["question"])
                page.press("#prompt", "Enter")
                _wait(page, f"window.supermix.replies.length > {n} || window.supermix.errors.length > {n_err}",
                      SITE_REPLY_TIMEOUT_S)
                if not page.evaluate(f"window.supermix.replies.length > {n}"):  # as the Python paths: no reply, no score
                    error = page.evaluate(f"window.supermix.errors[{n_err}]")
                    raise EvalSetupError(f"{item['id']}: the site's worker failed: {error}")
                r = page.evaluate(f"window.supermix.replies[{n}]")
                results.append({"reply": r["text"], "citations": [c["id"] for c in r["citations"]],
                                "shown": [{"id": s["id"], "text": s["text"]} for s in r["sources"]],
                                "finish_reason": r["finish_reason"], "prompt_tokens": r["prompt_tokens"],
                                "completion_tokens": r["completion_tokens"],
                                "seconds": round(time.perf_counter() - t0, 3)})
        finally:
            browser.close()
    info["external_requests"] = len(external)
    info["external_urls"] = external[:20]
    return {**info, "results": results}


# ----------------------------------------------------------------------------- the whole evaluation

def evaluate_natural(questions: Path, via: list[str], *, model_spec: str | None = None, root: Path = Path("models"),
                     tokenizer_dir: Path | None = None, index_path: Path = Path("datasets/built/index"),
                     export_dir: Path = Path("dist/export"), site_dir: Path = Path("dist/pages"),
                     limit: int | None = None, sample: int | None = None,
                     seed: int = 0, max_new_tokens: int | None = None, progress: bool = True, dtype: str = SITE_DTYPE) -> dict:
    """Score the questions through each path in `via`; the report described in the module docstring.
    Raises ItemError (bad JSONL line) or EvalSetupError (a missing input)."""
    from runtime_python.generation import GenerationConfig

    all_items = load_items(questions)
    items = select_items(all_items, limit, sample, seed)
    max_new_tokens = max_new_tokens or GenerationConfig().max_new_tokens
    report = {"questions": str(questions), "questions_sha256": sha256_file(Path(questions)), "n_items_file": len(all_items),
              "n_items": len(items), "selection": {"limit": limit, "sample": sample, "seed": seed if sample else None},
              "max_new_tokens": max_new_tokens, "temperature": 0, "onnx_dtype": dtype, "paths": {}}
    for name in via:
        t0 = time.perf_counter()
        if name == "torch":
            run = torch_path(model_spec, root, tokenizer_dir, index_path, items, max_new_tokens, progress)
        elif name == "onnx":
            run = onnx_path(export_dir, items, max_new_tokens, progress, dtype=dtype)
        else:
            run = site_path(site_dir, items, max_new_tokens, progress, dtype=dtype)
        results = run.pop("results")
        scored = [(item, score_item(item, r["reply"], r["citations"], r["shown"])) for item, r in zip(items, results)]
        seconds = time.perf_counter() - t0
        run.update(seconds=round(seconds, 2),
                   seconds_per_item=round(sum(r["seconds"] for r in results) / max(1, len(results)), 3),
                   metrics=aggregate(scored),
                   items=[{"id": item["id"], "kind": item["kind"], "question": item["question"],
                           "reply": r["reply"], "citations": r["citations"], "shown": [s["id"] for s in r["shown"]],
                           **{k: v for k, v in r.items() if k not in ("reply", "citations", "shown")}, "score": s}
                          for (item, s), r in zip(scored, results)])
        report["paths"][name] = run
    if len(via) > 1:
        report["agreement"] = agreement({name: {it["id"]: it["reply"] for it in run["items"]}
                                         for name, run in report["paths"].items()})
    return report


# ----------------------------------------------------------------------------- markdown

def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def markdown(report: dict, held_out: dict | None = None) -> str:
    """Per path, a kind x metric table; then, with several paths or the held-out report, one
    metric x path table (held-out grounded QA as its own column), and the paths' agreement."""
    cols = ["n", *METRICS]
    lines = []
    for name, run in report["paths"].items():
        lines += ["", f"### {name}: {report['n_items']} questions, {run['seconds_per_item']:.2f} s/question",
                  "", "| kind | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        rows = [*run["metrics"]["by_kind"].items(), ("**overall**", run["metrics"]["overall"])]
        lines += [f"| {kind} | " + " | ".join(_fmt(m[c]) for c in cols) + " |" for kind, m in rows]
        if "external_requests" in run:
            lines.append(f"\nrequests leaving 127.0.0.1: {run['external_requests']}")
    if len(report["paths"]) > 1 or held_out:
        names = list(report["paths"])
        head = names + (["held-out (templates)"] if held_out else [])
        lines += ["", "| metric | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
        held = {"correct": "grounded_qa", "citation_pass": "citation_accuracy", "fact_pass": "fact_recall_pass",
                "refusal_on_no_answer": "refusal_accuracy"}
        for c in METRICS:
            row = [_fmt(report["paths"][n]["metrics"]["overall"][c]) for n in names]
            if held_out:
                row.append(_fmt(held_out.get(held[c])) if c in held else "-")
            lines.append(f"| {c} | " + " | ".join(row) + " |")
    if report.get("agreement"):
        lines.append("")
    for pair, a in report.get("agreement", {}).items():
        differ = ", ".join(a["differ"][:20]) + (" ..." if len(a["differ"]) > 20 else "")
        lines.append(f"agreement {pair}: {a['same']}/{a['n']} identical replies" + (f"; differ: {differ}" if differ else ""))
    return "\n".join(lines)

