"""A training run's logs as the registry keeps them and the model card reads them.

A run folder (source/train.py) holds `run.json` (config, device, tokenizer sha256, and for a fine-tune the
`parent_checkpoint` it started from) and `metrics.jsonl` (one JSON object a line: {"step", "loss", ...} every
log_every steps, {"step", "val_loss", "val_bpb"} at each evaluation). runs/ is not in git, so `Registry.add`
copies the logs into the version folder; the card plots them from there.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

TRAINING_LOG, PRETRAIN_LOG = "training_metrics.jsonl", "pretrain_metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl; blank or non-object lines are skipped (a crash can cut the last line)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line) if line.strip() else None
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _metric_lines(path: Path, last_step: Any) -> bytes:
    """The lines of a metrics.jsonl up to `last_step` (a run may have logged past the checkpoint it saved)."""
    try:
        records = read_metrics(path)
    except OSError:
        return b""
    keep = [json.dumps(rec) for rec in records
            if not isinstance(last_step, int) or rec.get("step", math.inf) <= last_step]
    return ("\n".join(keep) + "\n").encode("utf-8") if keep else b""


def run_logs(ckpt: dict, path: Path) -> dict[str, bytes]:
    """Copies of the training logs for the version folder: {"training_metrics.jsonl": ..., and, when run.json
    names the checkpoint this run started from and that checkpoint still sits in its run folder,
    "pretrain_metrics.jsonl": ...}. Missing or foreign logs (another tokenizer) are skipped silently:
    a checkpoint copied out of its run folder simply has no curve."""
    logs: dict[str, bytes] = {}
    run = _run_json(path.parent, ckpt["tokenizer"])
    if run is None:
        return logs
    if data := _metric_lines(path.parent / "metrics.jsonl", ckpt.get("step")):
        logs[TRAINING_LOG] = data
    parent = run.get("parent_checkpoint") or run.get("init_from")  # builder sft writes parent_checkpoint
    # a relative path is as the run was started: from the repo root, where builder runs
    if isinstance(parent, str) and _run_json(Path(parent).parent, ckpt["tokenizer"]) is not None:
        if data := _metric_lines(Path(parent).parent / "metrics.jsonl", run.get("base_step")):
            logs[PRETRAIN_LOG] = data
    return logs


def _run_json(folder: Path, tokenizer_sha256: str) -> dict | None:
    """A run folder's run.json, or None when absent, unreadable or written for another tokenizer."""
    try:
        run = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return run if isinstance(run, dict) and run.get("tokenizer_sha256") == tokenizer_sha256 else None
