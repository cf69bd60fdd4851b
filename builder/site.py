"""The GitHub Pages site: web_static + the transformers.js bundle + onnxruntime-web's wasm + an export.

Design choices:
- Plain static files, relative URLs only, so the folder works from `python -m http.server`, from
  `https://USER.github.io/REPO/` and offline once cached. `.nojekyll` stops Pages from hiding files.
- Only what the browser loads is copied: `dist/transformers.js` (self-contained, no bare imports)
  and onnxruntime-web's `ort-wasm-simd-threaded.asyncify.{wasm,mjs}` (docs/pages/decisions.md), taken from the
  onnxruntime-web that transformers.js depends on (nested under it, or hoisted by npm) and checked
  against its pinned version, since a mismatched wasm fails at run time, not at load.
- From the export: config, generation config, tokenizer files, manifest, the ONNX files for dtype
  "q8" (default) and "fp32", and the browser index. Not model.safetensors, tokenizer.model or q4:
  transformers.js never reads them, and the site should stay small.
- `site.json` carries what must be identical to the Python runtime (system prompt, passage clipping,
  end tokens, generation defaults), written from the Python constants so the two cannot drift. For a
  version fine-tuned from an imported base it also carries `chat` (the spellings to defuse, and that the
  sources go into the question) and the model's end tokens: the page then renders the model's own chat
  template with transformers.js, as `HFTokenizer` does in Python.
- Cache names carry a hash of the model, index and vendor files (`cache_key`): a visitor's second
  visit is served from the Cache API, and a redeploy with other files starts a fresh cache.
- Built in a sibling `.partial` folder and swapped in, like the export: a failed build leaves the
  old site untouched.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

from source.files import replace_dir

WEB_STATIC = Path(__file__).resolve().parent.parent / "web_static"
BASE_STYLE = Path(__file__).resolve().parent.parent / "runtime_python" / "static" / "style.css"
MODEL_ID = "supermix"  # the site serves the export at models/supermix/
ORT_FILES = ("ort-wasm-simd-threaded.asyncify.wasm", "ort-wasm-simd-threaded.asyncify.mjs")
SKIP_STATIC = {"node_modules", "package.json", "package-lock.json"}
EXPORT_SKIP = {"model.safetensors", "tokenizer.model", "onnx/model_q4.onnx", "onnx/model_gqa_quantized.onnx",
               "README.md"}  # the gqa file prefills slower in onnxruntime-web than the portable one
EXPORT_SKIP_DIRS = ("gguf/",)  # `builder export --gguf`: llama.cpp / Ollama files, no use to the browser
# The weights a visitor gets unless they pick others (`?dtype=`): fp32, chosen in the browser by measurement
# (docs/pages/decisions.md): it decodes as fast as the int8 file in onnxruntime-web and gives exactly the
# `.pth`'s greedy tokens, where wasm's int8 kernels round differently from native onnxruntime's
SITE_DTYPE = "fp32"
SITE_DTYPES = ("fp32", "q8")  # the transformers.js dtypes whose files the site ships (`onnx_file`)
EXPORT_REQUIRED = ("config.json", "tokenizer.json", "tokenizer_config.json")
_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


def onnx_file(dtype: str) -> str:
    """The export's file for `dtype`, as OnnxBackend and the site (its `?dtype=`) load it."""
    from runtime_python.onnx_backend import ONNX_FILES

    return f"onnx/{ONNX_FILES[dtype]}"


class SiteError(Exception):
    """A missing input, with the command that makes it."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SiteError(f"cannot read {path}: {e}") from None


def npm_files(web_static: Path = WEB_STATIC) -> dict[str, Path | str]:
    """The transformers.js bundle and the matching onnxruntime-web files; SiteError when missing."""
    modules = web_static / "node_modules"
    tjs = modules / "@huggingface" / "transformers"
    if not (tjs / "dist" / "transformers.js").is_file():
        raise SiteError(f"{tjs / 'dist' / 'transformers.js'} is missing: run `npm ci --ignore-scripts` in {web_static}")
    pinned = _read_json(web_static / "package.json")["dependencies"]["@huggingface/transformers"]
    tjs_meta = _read_json(tjs / "package.json")
    if tjs_meta["version"] != pinned:
        raise SiteError(f"{tjs} is version {tjs_meta['version']}, package.json pins {pinned}: "
                        f"run `npm ci --ignore-scripts` in {web_static}")
    want = tjs_meta["dependencies"]["onnxruntime-web"]
    for ort in (tjs / "node_modules" / "onnxruntime-web", modules / "onnxruntime-web"):  # nested, then hoisted
        if (ort / "package.json").is_file() and _read_json(ort / "package.json")["version"] == want:
            missing = [f for f in ORT_FILES if not (ort / "dist" / f).is_file()]
            if missing:
                raise SiteError(f"{ort / 'dist'} lacks {', '.join(missing)}: run `npm ci --ignore-scripts` in {web_static}")
            return {"transformers": tjs / "dist" / "transformers.js", "ort_dist": ort / "dist",
                    "transformers_version": tjs_meta["version"], "ort_version": want}
    raise SiteError(f"no onnxruntime-web {want} (the version transformers.js {pinned} needs) under {modules}: "
                    f"run `npm ci --ignore-scripts` in {web_static}")


def runtime_settings(tokenizer=None) -> dict:
    """What the browser must share with runtime_python to build the same prompt and stop the same way. `tokenizer`:
    an imported base's `HFTokenizer` (a version fine-tuned from it); None or ours: our chat format."""
    from runtime_python.generation import GenerationConfig
    from source.hf_tokenizer import HFTokenizer
    from source.prompt import MIN_PASSAGE_CHARS
    from source.sft_data import DEFAULT_SYSTEM_PROMPT, PASSAGE_CHARS
    from source.tokenizer import CHAT_TOKENS, CONTROL_TOKENS

    gen = GenerationConfig()
    settings = {"system_prompt": DEFAULT_SYSTEM_PROMPT, "passage_chars": PASSAGE_CHARS,
                "min_passage_chars": MIN_PASSAGE_CHARS, "k": 3, "dtype": SITE_DTYPE,
                "end_tokens": [CONTROL_TOKENS[2], CONTROL_TOKENS[1], *CHAT_TOKENS],  # </s>, <s>, chat-role tokens
                "generation": {"temperature": gen.temperature, "top_p": gen.top_p,
                               "max_new_tokens": gen.max_new_tokens}}
    if isinstance(tokenizer, HFTokenizer):
        # the model's own template renders the chat (transformers.js's apply_chat_template); web_static/prompt.js
        # defuses these spellings and folds the sources into the question as HFTokenizer.chat_messages does, and
        # eos, bos and every special token end a reply, as in runtime_python.chat
        ends = [tokenizer.template_vars["eos_token"], tokenizer.template_vars.get("bos_token"), *tokenizer.special_ids]
        settings["end_tokens"] = [t for t in dict.fromkeys(ends) if t]
        settings["chat"] = {"defuse": tokenizer.defused_tokens, "fold_context": not tokenizer.native_context}
    return settings


def _copy(src: Path, dst: Path) -> int:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst.stat().st_size


def _content_key(site: Path) -> str:
    """A short hash of the model, index and vendor files: the browser's cache names carry it, so a
    site rebuilt with other files never serves stale ones from a visitor's cache."""
    from source.files import sha256_file

    h = hashlib.sha256()
    for p in sorted([*site.joinpath("models").rglob("*"), *site.joinpath("vendor").rglob("*")]):
        if p.is_file():
            h.update(f"{p.relative_to(site).as_posix()} {sha256_file(p)}\n".encode())
    return h.hexdigest()[:16]


def build_site(export_dir: Path, out_dir: Path, card: Path | None = None, web_static: Path = WEB_STATIC) -> dict:
    """Assemble the site into `out_dir` (replaced as a whole); returns byte counts per part."""
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    npm = npm_files(web_static)
    missing = [f for f in (*EXPORT_REQUIRED, *map(onnx_file, SITE_DTYPES)) if not (export_dir / f).is_file()]
    if missing:
        raise SiteError(f"{export_dir} is not a `builder export` folder: {', '.join(missing)} missing")
    if card is not None and not Path(card).is_file():
        raise SiteError(f"model card {card} not found: write one with `builder card --out FILE`")
    manifest = _read_json(export_dir / "manifest.json") if (export_dir / "manifest.json").is_file() else {}
    tokenizer = None  # ours: the settings are our chat format's
    if manifest.get("tokenizer") == "hf":  # a version fine-tuned from an imported base
        from source.hf_tokenizer import HFTokenizer, TokenizerError

        try:
            tokenizer = HFTokenizer.load(export_dir)
        except TokenizerError as e:
            raise SiteError(str(e)) from None

    partial = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    sizes = {"app": 0, "vendor": 0, "model": 0, "index": 0, "card": 0}
    try:
        for src in sorted(web_static.iterdir()):
            if src.name not in SKIP_STATIC and src.is_file() and not src.name.startswith("."):
                sizes["app"] += _copy(src, partial / src.name)
        # the base style is the one `supermix serve` uses: one stylesheet for both chat pages
        sizes["app"] += _copy(BASE_STYLE, partial / "style.css")
        sizes["vendor"] += _copy(npm["transformers"], partial / "vendor" / "transformers.js")
        for name in ORT_FILES:
            sizes["vendor"] += _copy(npm["ort_dist"] / name, partial / "vendor" / "ort" / name)
        model_dir = partial / "models" / MODEL_ID
        for src in sorted(export_dir.rglob("*")):
            rel = src.relative_to(export_dir).as_posix()
            skip = rel in EXPORT_SKIP or rel.startswith(EXPORT_SKIP_DIRS) or src.name.startswith(".")
            if src.is_file() and not skip:
                sizes["index" if rel.startswith("index/") else "model"] += _copy(src, model_dir / rel)
        has_index = (model_dir / "index" / "meta.json").is_file()
        card_name = None
        if card is not None:
            card = Path(card)
            card_name = "model-card.md"
            text = card.read_text(encoding="utf-8")
            sizes["card"] += _copy(card, partial / card_name)
            for ref in dict.fromkeys(_IMAGE.findall(text)):  # images beside the card (the loss curve)
                if "://" not in ref and not ref.startswith("/") and ".." not in ref and (card.parent / ref).is_file():
                    sizes["card"] += _copy(card.parent / ref, partial / ref)
        site = {"format": "supermix-site-v1", "cache_key": _content_key(partial), "model_id": MODEL_ID, "model_version": manifest.get("model_version"),
                "manifest": f"models/{MODEL_ID}/manifest.json" if manifest else None,
                "index": f"models/{MODEL_ID}/index/" if has_index else None, "card": card_name,
                "built": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "transformers_js": npm["transformers_version"], "onnxruntime_web": npm["ort_version"],
                **runtime_settings(tokenizer)}
        (partial / "site.json").write_text(json.dumps(site, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        (partial / ".nojekyll").write_bytes(b"")  # Pages: serve the folder as is (no Jekyll)
        replace_dir(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    files = sum(1 for p in out_dir.rglob("*") if p.is_file())
    return {"out": str(out_dir), "files": files, "bytes": {**sizes, "total": sum(sizes.values())},
            "retrieval": has_index, "model_version": site["model_version"]}
