"""Atomic checkpoint files.

- `model.pth`: weights and what is needed to rebuild the model, nothing executable:
  `{"format", "config", "model", "tokenizer", "kind", "step", "tokens", ...}`. Loads with
  `torch.load(weights_only=True)`.
- `train_state.pt`: optimizer state, step, tokens seen, RNG state — everything `--resume` needs to
  continue exactly, kept apart so a shipped `.pth` carries no optimizer moments.
- the two are one record: each save writes the same `step` and a fresh random `save_id` into both, and
  `--resume` refuses a pair that disagrees (a kill between the two renames once left weights at step 8
  with optimizer moments from step 4, and the resumed run diverged without a word)
Both are written to a temporary file in the same folder and renamed, so a crash mid-write never
leaves a truncated file where a good one was.

A checkpoint is input like any other: `read_checkpoint` validates its config field by field
(source.config rules) and compares every tensor's shape with the shapes that config implies, on the
meta device, before anything is allocated. A config asking for terabytes is an error, not an allocation.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from source.config import ModelConfig, config_dict
from source.files import umask_mode
from source.model import Transformer

FORMAT = "supermix-checkpoint-v1"
_COUNTS = ("step", "tokens", "params")  # optional metadata the registry and resume read as counts


class CheckpointError(ValueError):
    """A checkpoint that is unreadable, not ours, or inconsistent; the message names the file."""


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
    atomic_torch_save({"format": FORMAT, "config": config_dict(model.cfg), "model": state,
                       "tokenizer": tokenizer_sha256, "kind": kind, **metadata}, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a `.pth` safely and check it against its own config; errors name the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, not a torch file, pickled code
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a Supermix checkpoint (missing format={FORMAT!r})")
    for key in ("config", "model", "tokenizer"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint has no {key!r} field")
    if not isinstance(ckpt["tokenizer"], str) or not isinstance(ckpt.get("kind", ""), str):
        raise CheckpointError(f"{path}: fields 'tokenizer' and 'kind' must be strings")
    for key in _COUNTS:
        value = ckpt.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise CheckpointError(f"{path}: field {key!r} must be a non-negative integer, got {value!r:.40}")
    check_weights(checkpoint_config(ckpt, path), ckpt["model"], path)
    return ckpt


def checkpoint_config(ckpt: dict[str, Any], path: str | Path) -> ModelConfig:
    """The checkpoint's ModelConfig, every field checked against its allowed range."""
    raw = ckpt["config"]
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: 'config' must be a dict of ModelConfig fields, got {type(raw).__name__}")
    if unknown := sorted(map(repr, set(raw) - {f.name for f in fields(ModelConfig)})):
        raise CheckpointError(f"{path}: config has unknown field(s) {', '.join(unknown)[:200]}")
    try:
        return ModelConfig(**raw)
    except ValueError as exc:
        raise CheckpointError(f"{path}: config: {exc}") from None


def check_weights(cfg: ModelConfig, weights: Any, path: str | Path) -> None:
    """Every tensor the model needs, of the shape `cfg` implies, and nothing else. The expected shapes come from
    building the model on the meta device (shapes only, no memory), so they cannot drift from model.py."""
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: 'model' must be a dict of tensors, got {type(weights).__name__}")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    optional = {"lm_head.weight"} if cfg.tie_embeddings else set()  # tied: stored once, as embed_tokens
    missing = [k for k in expected if k not in weights and k not in optional]
    unexpected = [repr(k) for k in weights if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    for key, tensor in weights.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise CheckpointError(f"{path}: weight {key} is not a floating-point tensor ({type(tensor).__name__})")
        if tuple(tensor.shape) != expected[key]:
            raise CheckpointError(f"{path}: weights do not match the config: {key} has shape "
                                  f"{tuple(tensor.shape)}, the config implies {expected[key]}")


def new_save_id(step: int) -> str:
    return f"{step}-{secrets.token_hex(6)}"


def read_train_state(path: str | Path) -> dict[str, Any]:
    """`train_state.pt`, loaded safely; errors name the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, pickled code
        raise CheckpointError(f"{path}: not a readable training state ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not all(k in state for k in ("optimizer", "step", "tokens", "elapsed",
                                                                   "torch_rng")):
        raise CheckpointError(f"{path}: not a training state (needs optimizer, step, tokens, elapsed, torch_rng)")
    return state


def check_same_save(ckpt: dict[str, Any], state: dict[str, Any], folder: str | Path) -> None:
    """Refuse to resume from weights and optimizer state written by different saves. Checkpoints from before
    save ids compare steps alone."""
    steps, ids = (ckpt.get("step"), state.get("step")), (ckpt.get("save_id"), state.get("save_id"))
    if steps[0] != steps[1] or ids[0] != ids[1]:
        what = (f"model.pth is from step {steps[0]} but train_state.pt is from step {steps[1]}" if steps[0] != steps[1]
                else f"model.pth (save {ids[0]}) and train_state.pt (save {ids[1]}) come from different saves")
        raise CheckpointError(
            f"{folder}: {what}: the last save was interrupted between its two files, or one was copied in from "
            "elsewhere, so the weights and the optimizer state do not belong together and resuming would diverge. "
            "Hint: put back both files of one save, or train again without --resume.")


def model_from_checkpoint(ckpt: dict[str, Any], device: str | torch.device = "cpu") -> Transformer:
    """The model of a checkpoint `read_checkpoint` returned (config and shapes already checked, so building
    it allocates what the file holds)."""
    model = Transformer(ModelConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"], strict=False)  # strict=False: a tied lm_head.weight is not stored
    return model.to(device)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, dict[str, Any]]:
    ckpt = read_checkpoint(path)
    return model_from_checkpoint(ckpt, device), ckpt
