"""Atomic checkpoint files.

- `model.pth`: weights and what is needed to rebuild the model, nothing executable:
  `{"format", "config", "model", "tokenizer", "kind", "step", "tokens", ...}`. Loads with
  `torch.load(weights_only=True)`.
- `train_state.pt`: optimizer state, step, tokens seen, RNG state — everything `--resume` needs to
  continue exactly, kept apart so a shipped `.pth` carries no optimizer moments.
Both are written to a temporary file in the same folder and renamed, so a crash mid-write never
leaves a truncated file where a good one was.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from source.config import ModelConfig
from source.files import umask_mode
from source.model import Transformer

FORMAT = "supermix-checkpoint-v1"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(path: str | Path, model: Transformer, tokenizer_sha256: str, kind: str = "pretrain",
               **metadata: Any) -> None:
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # stored once; re-tied on load
    atomic_torch_save({"format": FORMAT, "config": asdict(model.cfg), "model": state,
                       "tokenizer": tokenizer_sha256, "kind": kind, **metadata}, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a `.pth` safely; errors name the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, not a torch file, pickled code
        raise ValueError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not a Supermix checkpoint (missing format={FORMAT!r})")
    for key in ("config", "model", "tokenizer"):
        if key not in ckpt:
            raise ValueError(f"{path}: checkpoint has no {key!r} field")
    return ckpt


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, dict[str, Any]]:
    ckpt = read_checkpoint(path)
    try:
        cfg = ModelConfig(**ckpt["config"])
    except TypeError as exc:
        raise ValueError(f"{path}: config field does not match ModelConfig ({exc})") from None
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device), ckpt
