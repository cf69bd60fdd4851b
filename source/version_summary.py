"""What a registered version says about itself: the training summary read from its checkpoint and run
folder, and the README.md of its folder. Kept apart from the registry's bookkeeping (ids, atomic writes,
the champion rule) so each file reads in one sitting."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from source.registry import Version


def finite_number(x: Any) -> float | None:
    """A metric as a float; None when absent or not a finite number."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def training_summary(ckpt: dict, path: Path) -> tuple[dict, float | None]:
    """(summary, val_bpb) from the checkpoint's metadata and, when it still sits in the run folder that
    wrote it, that folder's run.json (hardware) and metrics.jsonl (wall time and val_bpb at the saved step)."""
    tc, step = ckpt.get("train_config") or {}, ckpt.get("step")
    s: dict[str, Any] = {"steps": step, "tokens": ckpt.get("tokens"), "preset": ckpt.get("preset")}
    if tc:
        g = tc.get
        s.update(optimizer=f"AdamW lr={g('lr')} betas=({g('beta1')}, {g('beta2')}) wd={g('weight_decay')}",
                 schedule=f"warmup {g('warmup_steps')} steps, cosine to {g('min_lr_ratio')}x at step {g('max_steps')}",
                 batch=f"{g('batch_size')} x {g('seq_len')} tokens x {g('grad_accum')} accumulation",
                 precision=g("precision"), train_config=tc)
    val_bpb = None
    try:
        run = json.loads((path.parent / "run.json").read_text())
        if run.get("tokenizer_sha256") == ckpt["tokenizer"] and step is not None:
            s["hardware"] = f"{run.get('device')} x{run.get('processes', 1)}"
            for line in filter(str.strip, (path.parent / "metrics.jsonl").read_text().splitlines()):
                if (rec := json.loads(line)).get("step", math.inf) <= step:
                    s["seconds"] = rec.get("elapsed", s.get("seconds"))
                    val_bpb = rec.get("val_bpb", val_bpb)
    except (OSError, ValueError, AttributeError):
        pass  # a checkpoint copied out of its run folder: its own metadata is all there is
    return {k: v for k, v in s.items() if v is not None}, finite_number(val_bpb)


def version_readme(v: Version) -> str:
    """The generated README.md of a version folder."""
    c, t = v.config, v.training
    facts = {"parameters": f"{v.params:,}", "parent": v.parent, "architecture":
             f"{c.get('n_layers')} layers, dim {c.get('dim')}, {c.get('n_heads')} heads ({c.get('n_kv_heads')} kv), "
             f"vocab {c.get('vocab_size')}, context {c.get('max_seq_len')}",
             "tokenizer sha256": f"`{v.tokenizer_sha256}`", "dataset manifest sha256": v.dataset_manifest_sha256,
             **{f"training {k}": t.get(k) for k in ("steps", "tokens", "seconds", "hardware", "precision")},
             **dict(sorted(v.metrics.items()))}
    return "\n".join([
        f"# Supermix {v.id} ({v.kind})", "", f"Registered {v.created}.", "",
        *(f"- {k}: {val}" for k, val in facts.items() if val is not None), "", *([v.notes, ""] if v.notes else []),
        "`model.pth` loads with `source.checkpoint.load_model`; `tokenizer/` holds the SentencePiece and Hugging Face",
        f"tokenizer files; `model_info.json` is the registry entry. Verify them: `builder models info {v.id}`.", ""])
