"""The model card: a Hugging Face style README.md for one registry version, filled from real files only.

Design choices:
- every number comes from a file of *this* version: registry.json (config, params, training summary,
  metrics, champion reason), its eval.json (samples), tokenizer files (special tokens), the dataset
  manifest (sources, licences), the training logs the registry copied (loss curve), and the export's
  manifest.json (speed, file sizes, gates) or, without an export, a decode measured right here
- rows are built in Python as (label, value) pairs and a row whose data does not exist is left out, so the
  jinja2 template never has to print "unknown"; `placeholders()` fails the card if one slips through
- the YAML front matter is dumped with pyyaml, not templated, so it always parses
- model outputs are quoted between `<!-- samples -->` markers: they are the model's words and are
  exempt from the placeholder check (a model may well say "None")
- the card becomes HTML (docs, Hub, the site's model page) and quotes text nobody here wrote: registry
  notes, eval prompts, answers copying the corpus' <script> examples. So Jinja autoescapes every value
  into character references; filters that add Markdown syntax (`cell`, `code`, `blockquote`) escape first
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

import click
import yaml
from markupsafe import Markup, escape

from source.lineage import lineage_rows
from source.registry import CHAMPION_RULE, Registry, RegistryError, Version
from source.run_logs import PRETRAIN_LOG, TRAINING_LOG, read_metrics

TEMPLATES = Path(__file__).parent / "templates"
DATASET_MANIFEST = Path("datasets/manifests/default.json")
SFT_STATS = Path("datasets/manifests/sft-default-stats.json")
LOSS_PNG = "loss_curve.png"
SPEED_LABELS = {"torch_fp32_tok_s": "PyTorch (TorchBackend) fp32", "torch_int8_tok_s": "PyTorch (TorchBackend) int8",
                "onnx_fp32_tok_s": "ONNX Runtime fp32 (onnx/model.onnx)",
                "onnx_int8_tok_s": "ONNX Runtime int8 (onnx/model_quantized.onnx)",
                "onnx_int8_gqa_tok_s": "ONNX Runtime int8, GroupQueryAttention graph (onnx/model_gqa_quantized.onnx)"}
EVAL_METRICS = (("val_bpb", "validation bits per byte (lower is better)", "Supermix corpus validation split"),
                ("grounded_qa", "grounded QA: key fact and right citation", "Supermix held-out grounded questions"),
                ("citation_accuracy", "citation accuracy", "Supermix held-out grounded questions"),
                ("refusal_accuracy", "refusal accuracy on unanswerable questions", "Supermix held-out no-answer items"))
# "unknown"/"TODO" in any case; None/nan as Python prints them (an English "none" is fine)
_PLACEHOLDER = re.compile(r"(?i:\bunknown\b|\btodo\b)|\bNone\b|\bnan\b|\bNaN\b|\{\{|\}\}|\{%|%\}")
_SAMPLES = re.compile(r"<!-- samples -->.*?<!-- /samples -->", re.DOTALL)


def _json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"{what} {path}: {exc}") from None


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _duration(seconds: float) -> str:
    h, rest = divmod(int(round(seconds)), 3600)
    return f"{h} h {rest // 60} min" if h else f"{rest // 60} min {rest % 60} s"


def _num(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)


NATURAL_ROWS = (("correct (key facts + gold citation), answerable", "correct"),
                ("refused although answerable", "refused_answerable"),
                ("gold passage retrieved", "retrieval_hit"),
                ("refused, no source answers", "refusal_on_no_answer"),
                ("small talk answered", "chitchat_answered"),
                ("copy fidelity", "copy_fidelity"))


def _natural(path: Path) -> dict | None:
    """The natural-question figures `builder release` stored beside the version, as table rows."""
    if not path.is_file():
        return None
    nat = _json(path, "natural-question report").get("natural", {})
    paths = nat.get("paths", {})
    cell = lambda x: "-" if x is None else _num(x, 3)  # noqa: E731
    rows = [(label, [cell(run["metrics"]["overall"].get(key)) for run in paths.values()])
            for label, key in NATURAL_ROWS]
    agree = ", ".join(f"{pair} {cell(a.get('share'))}" for pair, a in (nat.get("agreement") or {}).items())
    return {"n_items": nat.get("n_items"), "paths": list(paths), "rows": rows, "agreement": agree}


def _cell(value: Any) -> Markup:
    # `<|end|>` in a table: GFM splits cells on its `|` even inside backticks, and GFM and Python-Markdown
    # disagree on `\|`; the character reference renders as "|" in both (and in web_static/markdown.js)
    return Markup(str(escape(str(value))).replace("|", "&#124;").replace("\n", " "))


def _code(value: Any) -> Markup:
    """`value` as a code span: nothing inside is markup, so no escaping, only a fence longer than any
    backtick run in it and no line break (a blank line would leave the span unclosed)."""
    text = " ".join(str(value).splitlines())
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return Markup(f"{fence}{pad}{text}{pad}{fence}")


def _blockquote(value: Any) -> Markup:
    """Every line of `value`, escaped, inside a Markdown block quote (a bare newline would leave it)."""
    return Markup("\n".join("> " + str(escape(line)) for line in str(value).splitlines() or [""]))


def placeholders(text: str) -> list[str]:
    """Lines of a rendered card (model outputs excepted) that still say unknown/TODO/None or hold template syntax."""
    return [line for line in _SAMPLES.sub("", text).splitlines() if _PLACEHOLDER.search(line)]


def _special_tokens(tok_dir: Path) -> list[str]:
    found: list[str] = []
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = tok_dir / name
        if not path.is_file():
            continue
        data = _json(path, "tokenizer file")
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            if isinstance(data.get(key), str):
                found.append(data[key])
        found += [t for t in data.get("additional_special_tokens", []) if isinstance(t, str)]
    return list(dict.fromkeys(found))


def _log_summary(records: list[dict]) -> dict:
    """Steps, tokens and wall time at the last logged training step of a metrics.jsonl."""
    train = [r for r in records if "loss" in r]
    return {k: train[-1][src] for k, src in (("steps", "step"), ("tokens", "tokens"), ("seconds", "elapsed"))
            if train and src in train[-1]}


def phase_name(kind: str) -> str:
    """What a version's own training run was, by its registry kind."""
    return {"pretrain": "pretraining", "dpo": "preference tuning"}.get(kind, "fine-tuning")


def plot_loss(folder: Path, png: Path, kind: str = "sft") -> bool:
    """Training (and, for a fine-tune, pretraining) loss against step, one continuous x axis; False (no PNG)
    when the version keeps no training logs. A DPO version plots its own run alone: its loss is the
    preference loss (ln 2 at the start), not a cross-entropy to put on the pretraining's axis."""
    logs = [(phase_name(kind), TRAINING_LOG)]
    if kind != "dpo":
        logs.insert(0, ("pretraining", PRETRAIN_LOG))
    phases = [(name, read_metrics(folder / log)) for name, log in logs if (folder / log).is_file()]
    phases = [(n, recs) for n, recs in phases if any("loss" in r or "val_loss" in r for r in recs)]
    if not phases:
        return False
    import matplotlib
    matplotlib.use("Agg")  # no display, no GUI toolkit: the card is built on servers and in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    offset = 0
    for i, (name, recs) in enumerate(phases):
        label = name if len(phases) > 1 or kind == "dpo" else "training"
        train = [(offset + r["step"], r["loss"]) for r in recs if "loss" in r and "step" in r]
        val = [(offset + r["step"], r["val_loss"]) for r in recs if "val_loss" in r and "step" in r]
        if train:
            ax.plot(*zip(*train), color=f"C{i}", lw=1.2, label=f"{label} loss")
        if val:
            ax.plot(*zip(*val), "o--", color=f"C{i}", ms=4, lw=0.8, label=f"{label} val loss")
        last = max((s for s, _ in train + val), default=offset)
        if i + 1 < len(phases):
            ax.axvline(last, color="grey", lw=0.8, ls=":")
        offset = last
    ax.set_xlabel("step" + (f" ({', then '.join(name for name, _ in phases)})" if len(phases) > 1 else ""))
    ax.set_ylabel("DPO loss, -ln sigmoid(reward margin)" if kind == "dpo" else "cross-entropy loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, png)  # atomic like source.files.atomic_write_bytes: matplotlib writes the file itself
    return True


def measure_torch_speed(model_path: Path, tokenizer_dir: Path, prompt: str, new_tokens: int = 64) -> dict:
    """Greedy decode tokens/s of TorchBackend, fp32 and int8: new tokens over prefill + decode time, the best
    of two timed runs after a warm-up. End-of-text is masked so every run decodes `new_tokens` tokens."""
    import torch

    from runtime_python.backends import TorchBackend
    from runtime_python.generation import GenerationConfig, sample_next

    greedy, speed = GenerationConfig(temperature=0.0), {}
    for dtype in ("fp32", "int8"):
        backend = TorchBackend.load(model_path, tokenizer_dir, dtype=dtype)
        tok = backend.tokenizer
        ids = [tok.bos_id, *tok.encode(prompt)][: backend.max_seq_len - new_tokens]
        n = min(new_tokens, backend.max_seq_len - len(ids))
        times = []
        for _ in range(3):
            start, out = time.perf_counter(), []
            with torch.inference_mode():
                logits = backend.prefill(ids)
                for i in range(n):
                    logits[tok.eos_id] = float("-inf")
                    out.append(sample_next(logits, greedy, out))
                    if i + 1 < n:
                        logits = backend.decode(out[-1])
            times.append(time.perf_counter() - start)
        backend.release()
        speed[f"torch_{dtype}_tok_s"] = round(n / min(times[1:]), 1)
    return speed


def _dataset(v: Version, manifest_path: Path) -> dict:
    if not manifest_path.is_file():
        raise click.ClickException(f"dataset manifest {manifest_path} not found: pass --dataset-manifest FILE "
                                   "(the sources and licences of the card come from it)")
    from source.files import sha256_file

    manifest, file_sha = _json(manifest_path, "dataset manifest"), sha256_file(manifest_path)
    sources = [s for s in manifest.get("sources", []) if isinstance(s, dict) and s.get("status", "ok") == "ok"]
    if not sources:
        raise click.ClickException(f"dataset manifest {manifest_path}: field 'sources' lists no built source")
    rows = [(s["name"], s.get("license", "see the recipe"), _num(s.get("records", {}).get("after_pii", "-")),
             f"{s['text_mb']:.1f} MB" if isinstance(s.get("text_mb"), (int, float)) else "-") for s in sources]
    if v.dataset_manifest_sha256:
        sha = f"`{v.dataset_manifest_sha256}` (recorded in the registry for {v.id})"
        if v.dataset_manifest_sha256 != file_sha:
            sha += f"; the manifest read for this card, {manifest_path}, has sha256 `{file_sha}`"
    else:
        sha = f"`{file_sha}` (sha256 of {manifest_path}; {v.id}'s registry entry has no manifest hash)"
    totals = manifest.get("totals", {})
    return {"rows": rows, "sha": sha, "path": str(manifest_path), "names": [s["name"] for s in sources],
            "licences": sorted({r[1] for r in rows}),
            "total": f"{_num(totals['records'])} records, {totals['text_mb']:.1f} MB of text"
            if {"records", "text_mb"} <= set(totals) else ""}


def _training_rows(v: Version, folder: Path) -> list[tuple[str, str]]:
    t, rows = v.training, []
    pre = _log_summary(read_metrics(folder / PRETRAIN_LOG)) if (folder / PRETRAIN_LOG).is_file() else {}
    if pre:
        rows.append(("base run it started from", ", ".join(
            x for x in (f"{pre['steps']:,} steps" if "steps" in pre else "",
                        f"{pre['tokens']:,} tokens" if "tokens" in pre else "",
                        _duration(pre["seconds"]) if "seconds" in pre else "") if x)))
    phase = phase_name(v.kind)
    if "steps" in t:
        rows.append((f"{phase} steps", f"{t['steps']:,}"))
    if "tokens" in t:
        rows.append((f"{phase} tokens", f"{t['tokens']:,}"))
    if v.kind == "pretrain" and "tokens" in t:
        meta = _corpus_tokens(v.tokenizer_sha256)
        if meta:
            rows.append(("epochs", f"{t['tokens'] / meta:.3f} over the corpus' {meta:,} training tokens"))
    if v.kind != "pretrain" and SFT_STATS.is_file():
        total = _json(SFT_STATS, "SFT data stats").get("train", {}).get("total")
        if isinstance(total, int):
            rows.append(("fine-tuning set", f"{total:,} chat examples ({SFT_STATS})"))
    for key, label in (("batch", "batch"), ("optimizer", "optimizer"), ("schedule", "LR schedule"),
                       ("precision", "precision"), ("hardware", "hardware"), ("preset", "preset")):
        if t.get(key) is not None:
            rows.append((label, str(t[key]) + (" (bf16 autocast, fp32 weights)" if t[key] == "bf16" else "")))
    if "seconds" in t:
        rows.append((f"{phase} wall time", _duration(t["seconds"])))
    return rows


def _corpus_tokens(tokenizer_sha: str) -> int | None:
    """Training tokens of the corpus' token shards for this tokenizer, when they are still on disk."""
    for meta in sorted(Path("runs/tokens").glob("*/meta.json")):
        try:
            m = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        if m.get("tokenizer_sha256") == tokenizer_sha and isinstance(m.get("train", {}).get("tokens"), int):
            return m["train"]["tokens"]
    return None


def card_context(registry: Registry, ref: str, export_dir: Path | None = None,
                 dataset_manifest: Path = DATASET_MANIFEST, measure: bool = True) -> dict:
    """Everything the template shows, as strings and (label, value) rows; raises ClickException naming the file."""
    try:
        state, v = registry.load(), registry.get(ref)
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    folder, c = registry.root / "versions" / v.id, v.config
    tok_dir = folder / "tokenizer"
    eval_path = folder / "eval.json"
    ev = _json(eval_path, "eval report") if eval_path.is_file() else {}
    metrics = {k: v.metrics.get(k, ev.get(k)) for k, *_ in EVAL_METRICS}
    metrics = {k: x for k, x in metrics.items() if isinstance(x, (int, float))}
    export = _json(export_dir / "manifest.json", "export manifest") if export_dir else None
    if export is not None and export.get("format") != "supermix-export-v1":
        raise click.ClickException(f"export manifest {export_dir / 'manifest.json'}: field 'format' is "
                                   f"{export.get('format')!r}, expected 'supermix-export-v1'")
    head_dim = c.get("head_dim_override") or c["dim"] // c["n_heads"]
    base = next((p for p in v.lineage if isinstance(p, dict) and p.get("stage") == "base"), None)
    kv_bytes = 2 * c["n_layers"] * c["n_kv_heads"] * head_dim * c["max_seq_len"] * 4
    samples = [s for s in ev.get("samples", []) if isinstance(s, dict) and "prompt" in s and "answer" in s]
    if export is not None:
        speed = {k: export.get("speed", {})[k] for k in SPEED_LABELS if k in export.get("speed", {})}
        files = [(f["path"], _mb(f["bytes"])) for f in export.get("files", [])]
    else:
        prompt = samples[0]["prompt"] if samples else "What does json.dumps do?"
        speed = measure_torch_speed(folder / "model.pth", tok_dir, prompt) if measure else {}
        files = [(f["path"].split("/", 2)[-1], _mb(f["bytes"])) for f in v.files]
    champion = state["champion"]
    return {
        "v": v, "name": f"supermix-{v.id}", "kind": v.kind, "base": base,
        "architecture": [
            ("architecture", "decoder-only transformer, " + (
                f"the architecture of its base {base['name']} ({base.get('model_type')})" if base else
                "`LlamaForCausalLM`-compatible") + " (RMSNorm, SwiGLU, grouped-query attention"
             + (", tied embeddings)" if c.get("tie_embeddings") else ")")),
            ("layers", c["n_layers"]), ("hidden size", c["dim"]), ("attention heads", c["n_heads"]),
            ("key/value heads", c["n_kv_heads"]), ("head dim", head_dim), ("FFN (SwiGLU) hidden", c["ffn_hidden"]),
            ("positional encoding", f"RoPE, theta {c['rope_theta']:g}"),
            ("parameters", f"{v.params:,} total, {v.params:,} trainable (the released weights are all trainable; "
                           "LoRA fine-tunes are merged)"),
            ("context window", f"{c['max_seq_len']:,} tokens")],
        "tokenizer": [("type", f"the base's own (`tokenizer.json` of {base['name']}) and its chat template" if base else
                       "SentencePiece BPE with byte fallback (`tokenizer.model`), plus `tokenizer.json`"),
                      ("vocabulary", f"{c['vocab_size']:,}"),
                      ("special tokens", ", ".join(_special_tokens(tok_dir))),
                      ("tokenizer sha256", f"`{v.tokenizer_sha256}`")],
        "dataset": _dataset(v, dataset_manifest),
        "training": _training_rows(v, folder), "lineage": lineage_rows(v.lineage, v.training, v.kind, v.parent, v.id),
        "champion": {"rule": CHAMPION_RULE, "is": v.id == champion, "id": champion,
                     "reason": state["champion_reason"] or "promoted by hand"},
        "metrics": [(label, _num(metrics[k])) for k, label, _ in EVAL_METRICS if k in metrics],
        "metric_values": metrics,
        "eval_counts": ", ".join(f"{ev[k]} {label}" for k, label in (("n_grounded", "grounded questions"),
                                                                    ("n_refusal", "no-answer items")) if k in ev),
        "samples": samples,
        "natural": _natural(folder / "eval-natural.json"),
        "requirements": [("Python", f"{sys.version_info.major}.{sys.version_info.minor} (>= 3.11)"),
                         ("torch", _torch_version()),
                         ("RAM (weights + full KV cache)",
                          f"about {_mb(v.params * 4 + kv_bytes)} in fp32, {_mb(v.params + kv_bytes)} with int8 "
                          "weights, on top of the Python process")],
        "speed": [(SPEED_LABELS[k], f"{x:,.1f}") for k, x in speed.items()],
        "speed_where": (f"measured by `builder export` ({export.get('created', 'export time')})" if export is not None
                        else f"measured by `builder card` on this machine ({platform.machine()}, {os.cpu_count()} "
                             f"CPUs, torch threads: {_torch_threads()}), greedy, batch 1, 64 new tokens"),
        "export": export, "files": files,
        "gates": [(g["name"], "passed" if g.get("passed") else "FAILED", str(g.get("value", "-")),
                   str(g.get("threshold", "-"))) for g in (export or {}).get("gates", [])],
        "loss_png": None,
    }


def _torch_version() -> str:
    import torch
    return torch.__version__.split("+")[0]


def _torch_threads() -> int:
    import torch
    return torch.get_num_threads()


def front_matter(ctx: dict) -> dict:
    v = ctx["v"]
    base = ctx["base"]
    licence = "apache-2.0" if base is None else (base.get("licence") or "other").lower()
    meta = {"license": licence if re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", licence) else "other", "language": ["en"],
            "library_name": "transformers",
            "tags": ["supermix", "llama", "text-generation", "chat", "retrieval-augmented", "cpu",
                     *(["onnx", "transformers.js"] if ctx["export"] is not None else [])],
            "datasets": ctx["dataset"]["names"], "pipeline_tag": "text-generation"}
    if v.parent:
        meta["base_model"] = f"supermix-{v.parent}"
    elif base is not None:
        meta["base_model"] = base["name"]
    results = [{"task": {"type": "text-generation", "name": label},
                "dataset": {"type": "supermix", "name": dataset},
                "metrics": [{"type": k, "value": ctx["metric_values"][k], "name": label}]}
               for k, label, dataset in EVAL_METRICS if k in ctx["metric_values"]]
    if results:
        meta["model-index"] = [{"name": ctx["name"], "results": results}]
    return meta


def render_card(ctx: dict) -> str:
    """The card's text; ClickException listing the lines if a placeholder survived."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                             autoescape=True, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(cell=_cell, code=_code, blockquote=_blockquote)
    body = env.get_template("model_card.md.j2").render(**ctx)
    text = "---\n" + yaml.safe_dump(front_matter(ctx), sort_keys=False, allow_unicode=True) + "---\n\n" + body
    if bad := placeholders(text):
        raise click.ClickException(f"model card of {ctx['v'].id}: placeholder left in {len(bad)} line(s): "
                                   + " | ".join(b.strip()[:80] for b in bad[:5]))
    return text


def write_card(registry: Registry, ref: str, out: Path, export_dir: Path | None = None,
               dataset_manifest: Path = DATASET_MANIFEST) -> tuple[Path, Path | None]:
    """Render the card of version `ref` to `out` and its loss curve next to it; (card, png or None)."""
    from source.files import atomic_write_bytes

    ctx = card_context(registry, ref, export_dir, dataset_manifest)
    png = out.parent / LOSS_PNG
    if plot_loss(registry.root / "versions" / ctx["v"].id, png, ctx["v"].kind):
        ctx["loss_png"] = LOSS_PNG
    atomic_write_bytes(out, render_card(ctx).encode("utf-8"))
    return out, png if ctx["loss_png"] else None
