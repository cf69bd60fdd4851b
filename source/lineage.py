"""A version's lineage as data: the list of training pieces (pretrain, SFT, DPO, ...) that produced its weights,
oldest first, each {name, stage, parent, data_sha256, steps, seed, lr, warmup_steps, wall_seconds, ...}.

Design choices:
- read from the run folders, not typed by hand: a run folder's run.json (kind, train config, tokenizer, the
  `parent_checkpoint` it started from, the hash of the data it read) and metrics.jsonl (wall time at each
  logged step). The chain is followed backwards through `parent_checkpoint` until a run started from
  scratch or a folder that is gone (`from` then names the checkpoint it came from)
- a piece's `steps` is the step of the checkpoint that was used: the leaf's own, an ancestor's as its child
  recorded it (`base_step`), since a base may have been trained further after the child started
- registry entries from before lineage was recorded have none; `lineage_rows` derives the one piece their
  `training` summary describes and says the earlier ones are not recorded, rather than guessing
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from source.run_logs import read_metrics

FIELDS = ("name", "stage", "parent", "data_sha256", "steps", "seed", "lr", "warmup_steps", "wall_seconds")
DATA_KEYS = ("data_sha256", "sft_data_sha256", "corpus_manifest_sha256")  # run.json keys, most specific first
MAX_DEPTH = 64  # a parent_checkpoint cycle (a run folder trained from itself) must not loop forever


def _run_json(folder: Path) -> dict | None:
    try:
        run = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return run if isinstance(run, dict) else None


def run_piece(folder: Path, step: int | None, run: dict | None = None) -> dict | None:
    """One lineage entry from a run folder, at checkpoint `step` (None: the last logged step)."""
    run = run if run is not None else _run_json(folder)
    if run is None:
        return None
    train = run.get("train") if isinstance(run.get("train"), dict) else {}
    try:
        records = read_metrics(folder / "metrics.jsonl")
    except OSError:
        records = []
    logged = [r for r in records if isinstance(r.get("step"), int) and "elapsed" in r
              and (step is None or r["step"] <= step)]
    piece: dict[str, Any] = {
        "name": folder.name, "stage": run.get("kind"), "parent": None,
        "data_sha256": next((run[k] for k in DATA_KEYS if isinstance(run.get(k), str)), None),
        "steps": step if step is not None else (logged[-1]["step"] if logged else None),
        "seed": train.get("seed"), "lr": train.get("lr"), "warmup_steps": train.get("warmup_steps"),
        "wall_seconds": logged[-1]["elapsed"] if logged else None,
        "run": folder.as_posix(), "tokenizer_sha256": run.get("tokenizer_sha256")}
    if isinstance(run.get("preset"), str):
        piece["preset"] = run["preset"]
    return piece


def lineage_from_runs(checkpoint: str | Path, step: int | None = None) -> list[dict]:
    """The pieces behind `checkpoint` (a model.pth still in its run folder), oldest first; [] when its folder
    has no run.json (a checkpoint copied out of its run)."""
    pieces: list[dict] = []
    folder, seen = Path(checkpoint).parent, set()
    while len(pieces) < MAX_DEPTH and folder.resolve() not in seen:
        seen.add(folder.resolve())
        run = _run_json(folder)
        piece = run_piece(folder, step, run) if run is not None else None
        if piece is None:
            break
        pieces.append(piece)
        parent = run.get("parent_checkpoint") or run.get("init_from")
        if not isinstance(parent, str):
            break
        piece["from"] = parent
        base_step = run.get("base_step")
        folder, step = Path(parent).parent, base_step if isinstance(base_step, int) else None
    pieces.reverse()
    for before, piece in zip(pieces, pieces[1:]):
        piece["parent"] = before["name"]
    return pieces


def check_lineage(value: Any) -> str | None:
    """None when `value` is a valid lineage list, else what is wrong (for the registry's error message)."""
    if not isinstance(value, list):
        return "must be a list of pieces"
    for i, piece in enumerate(value):
        if not isinstance(piece, dict) or not isinstance(piece.get("stage"), (str, type(None))):
            return f"[{i}] must be an object with a 'stage'"
    return None


def _show(x: Any, kind: str = "") -> str:
    if x is None:
        return "not recorded"
    if kind == "sha" and isinstance(x, str):
        return x[:12]
    if kind == "seconds" and isinstance(x, (int, float)) and math.isfinite(x):
        return f"{x / 60:.0f} min" if x >= 60 else f"{x:.0f} s"
    if isinstance(x, int) and not isinstance(x, bool) and kind != "plain":
        return f"{x:,}"
    return f"{x:g}" if isinstance(x, float) else str(x)


def lineage_rows(lineage: list[dict], training: dict, kind: str, parent: str | None, vid: str) -> dict:
    """What the model card's lineage table shows: {"rows": [[piece, stage, from, data, steps, seed, lr,
    wall time]], "note": str}. A version registered before lineage was recorded gets its last piece derived
    from its training summary."""
    pieces, note = lineage, ""
    if not pieces:
        tc = training.get("train_config") or {}
        pieces = [{"name": vid, "stage": kind, "parent": parent, "data_sha256": None, "steps": training.get("steps"),
                   "seed": tc.get("seed"), "lr": tc.get("lr"), "wall_seconds": training.get("seconds")}]
        note = (f"{vid} was registered before lineage was recorded: this row is derived from its training summary, "
                f"and the pieces before it (from {parent or 'scratch'}) are not recorded in the registry.")
    rows = [[str(p.get("name") or "-"), _show(p.get("stage")), str(p.get("parent") or p.get("from") or ("imported" if p.get("stage") == "base" else "scratch")),
             _show(p.get("data_sha256"), "sha"), _show(p.get("steps")), _show(p.get("seed"), "plain"), _show(p.get("lr")),
             _show(p.get("wall_seconds"), "seconds")] for p in pieces]
    return {"rows": rows, "note": note}
