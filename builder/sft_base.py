"""`builder sft --base NAME`: fine-tuning an imported Hugging Face base (`builder base import`).

Design choices:
- The base runs on our own Transformer (source.base_model), so `source.train.train` fine-tunes it as it does
  our models: the same loop, LoRA through source/lora.py (merged into the weights at save), the same loss on
  assistant tokens only.
- Chats are tokenized at sft time with the base's tokenizer and chat template (`HFTokenizer.encode_chat`, its
  loss mask), from the text of `builder sft-data`'s JSONL: the data folder stays tokenizer-free, so one
  `sft-data` folder serves our models and any base.
- The base's files are re-hashed before training (a folder changed since import is refused); the run's
  tokenizer/ folder gets the base's tokenizer files and licence, and the result is registered as a version
  whose folder holds everything it needs to run, with the base (name, source, licence, sha256s) as the first
  piece of its lineage.
- `--bf16` holds the frozen base in bf16 under LoRA (half the memory; adapters stay fp32 and are merged into
  fp32 weights); a full fine-tune keeps fp32 master weights, so it refuses the flag.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import click


def find_base(root: Path, name: str) -> dict | None:
    """The registry entry of base `name`, or None when there is no registry or no such base."""
    from source.registry import Registry

    if not (root / "registry.json").is_file():
        return None
    return Registry(root).load()["bases"].get(name)


def prepare(entry: dict, out_dir: Path, lora: bool, bf16: bool, grad_checkpointing: bool, seq_len: int):
    """(tokenizer, init_model, model config, run metadata) for fine-tuning base `entry`; ClickException when its
    folder changed since import, or when the settings do not fit it."""
    import torch

    from source.base_model import base_config, base_piece, read_weights, write_tokenizer_folder
    from source.hf_base import BaseError, verify_base
    from source.hf_tokenizer import HFTokenizer

    if bf16 and not lora:
        raise click.ClickException("--bf16 holds the frozen base in bf16 for --lora; a full fine-tune keeps fp32 "
                                   "weights (its precision is the preset's, --set precision=bf16|fp32)")
    folder = Path(entry["source"])
    if bad := {f: r for f, r in verify_base(entry).items() if r != "ok"}:
        f, problem = next(iter(bad.items()))
        raise click.ClickException(f"base {entry['name']}: {folder / f}: {problem}; the folder changed since "
                                   "`builder base import` (import it again under a new name to use it)")
    try:
        cfg = base_config(folder)
        tok = HFTokenizer.load(folder)
    except (BaseError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if tok.chat_template is None:
        raise click.ClickException(f"base {entry['name']} has no chat template (tokenizer_config.json "
                                   "chat_template or chat_template.jinja): SFT needs one to lay out the chats")
    if seq_len > cfg.max_seq_len:
        raise click.ClickException(f"seq_len={seq_len} exceeds the base's max_position_embeddings={cfg.max_seq_len}")
    cfg = replace(cfg, gradient_checkpointing=grad_checkpointing)
    write_tokenizer_folder(entry, out_dir / "tokenizer")
    dtype = torch.bfloat16 if bf16 else torch.float32

    def init_model():
        model = read_weights(folder, cfg, dtype)
        return model.train()

    metadata = {"base": base_piece(entry), "base_name": entry["name"], "base_bf16": bf16}
    return tok, init_model, cfg, metadata


def register(out_dir: Path, root: Path, entry: dict, echo: Callable[[str], None] = click.echo) -> str:
    """Register the run's model.pth (with its tokenizer/ folder) as a new version; lineage: base, then the run."""
    from source.base_model import base_piece
    from source.lineage import lineage_from_runs
    from source.registry import Registry, RegistryError

    pieces = lineage_from_runs(out_dir / "model.pth")
    if pieces:
        pieces[0]["parent"] = entry["name"]
    try:
        version = Registry(root).add(out_dir / "model.pth", out_dir / "tokenizer", lineage=[base_piece(entry), *pieces],
                                     notes=f"fine-tuned from base {entry['name']} (licence: {entry['licence']['name']})")
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from None
    echo(f"registered {version.id} (base {entry['name']}, licence {entry['licence']['name']})")
    return version.id
