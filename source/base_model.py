"""An imported Hugging Face base as our own `Transformer`, with its `HFTokenizer`.

    base_config(folder)                        -> ModelConfig equivalent to its config.json
    load_base(name or folder, registry, ...)   -> (Transformer, HFTokenizer, registry entry or None)

Design choices:
- One stack: a Llama or Qwen2 base runs on our forward passes (training, evaluation, the runtime's batched
  TorchBackend, the ONNX graphs), not on transformers, so every later stage takes it as it takes our models.
  Our model is HF-layout Llama already (rotate_half RoPE, HF parameter names); the variants small checkpoints
  use are ModelConfig fields (untied head, head_dim, biases, rope scaling, norm eps).
- A registered base is re-hashed first (`verify_base`): a folder that changed since `builder base import`
  is refused with the file that changed, so a fine-tune's lineage names the weights it really started from.
  A folder given by path is checked as `builder base import` checks it (nothing recorded).
- Weights are read from the safetensors files one tensor at a time into a model built on the meta device, so
  loading a base holds one copy of the weights (cast to `dtype` as they are read), not two.
"""

from __future__ import annotations

from pathlib import Path

import torch

from source.config import ModelConfig
from source.hf_base import BaseError, get_base, inspect_base, read_architecture, rope_fields, verify_base, weight_files
from source.hf_tokenizer import HFTokenizer, read_json_object
from source.model import Transformer, rope_tables
from source.registry import Registry


def base_config(folder: str | Path, max_seq_len: int | None = None) -> ModelConfig:
    """The ModelConfig of a base folder's config.json (checked as `builder base import` checks it). `max_seq_len`
    caps the context (the rotary tables are max_seq_len x head_dim floats)."""
    folder = Path(folder)
    arch, raw = read_architecture(folder), read_json_object(folder / "config.json")
    where = str(folder / "config.json")
    eps = raw.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise BaseError(f"{where}: rms_norm_eps must be a number, got {eps!r:.40}")
    fields = dict(vocab_size=arch.vocab, dim=arch.hidden, n_layers=arch.layers, n_heads=arch.heads,
                  n_kv_heads=arch.kv_heads, ffn_hidden=arch.intermediate,
                  max_seq_len=min(arch.max_positions, max_seq_len or arch.max_positions), rope_theta=arch.rope_theta,
                  norm_eps=float(eps), tie_embeddings=arch.tied_embeddings,
                  head_dim_override=arch.head_dim if arch.head_dim * arch.heads != arch.hidden else 0,
                  qkv_bias=arch.attention_bias, o_bias=arch.attention_bias and arch.model_type == "llama",
                  mlp_bias=arch.mlp_bias, **rope_fields(arch.rope_scaling, where))
    try:
        return ModelConfig(**fields)
    except ValueError as exc:
        raise BaseError(f"{where}: {exc}") from None


def read_weights(folder: Path, cfg: ModelConfig, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> Transformer:
    """Our Transformer with the folder's safetensors weights (one or many shards), cast to `dtype`."""
    from safetensors import safe_open

    with torch.device("meta"):
        model = Transformer(cfg)
    want = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for name in weight_files(folder):
        with safe_open(folder / name, framework="pt", device=str(device)) as f:
            for key in f.keys():
                ours = key.removeprefix("model.")
                if ours in want and not (cfg.tie_embeddings and ours == "lm_head.weight"):
                    state[ours] = f.get_tensor(key).to(dtype)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    if missing := sorted(set(want) - set(state)):
        raise BaseError(f"{folder}: tensor {missing[0]} missing from the weights")
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:  # assign replaced both parameters: tie them again, as one matrix
        model.lm_head.weight = model.embed_tokens.weight
    cos, sin = rope_tables(cfg)  # buffers are not in the state dict: computed, as at construction
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    return model.eval()


def load_base(ref: str | Path, registry: Registry | None = None, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu", max_seq_len: int | None = None
              ) -> tuple[Transformer, HFTokenizer, dict | None]:
    """A registered base (by name, its files re-hashed first) or a base folder -> (model, tokenizer, entry).
    BaseError names the file that changed, or what a folder lacks."""
    entry = None
    if registry is not None and not Path(ref).is_dir():
        entry = get_base(registry, str(ref))
        report = verify_base(entry)
        if bad := {f: r for f, r in report.items() if r != "ok"}:
            f, problem = next(iter(bad.items()))
            raise BaseError(f"base {entry['name']}: {Path(entry['source']) / f}: {problem}; the folder changed since "
                            "`builder base import` (import it again under a new name to use it)")
        folder = Path(entry["source"])
    else:
        folder = Path(ref).resolve()
        inspect_base(folder)
    cfg = base_config(folder, max_seq_len)
    tokenizer = HFTokenizer.load(folder)
    return read_weights(folder, cfg, dtype, device), tokenizer, entry


def write_tokenizer_folder(entry: dict, dest: str | Path) -> Path:
    """Copy a base's tokenizer files and licence into `dest` (a run's tokenizer/ folder, which becomes the
    version's): the version folder then runs and ships without the base folder."""
    import shutil

    from source.hf_tokenizer import HF_TOKENIZER_FILES

    src, dest = Path(entry["source"]), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    names = [n for n in HF_TOKENIZER_FILES if (src / n).is_file()] + (
        [entry["licence"]["file"]] if entry["licence"].get("file") else [])
    for name in names:
        tmp = dest / f".{name}.tmp"
        shutil.copyfile(src / name, tmp)
        tmp.replace(dest / name)
    return dest


def base_piece(entry: dict) -> dict:
    """The first piece of a fine-tuned version's lineage: the imported base it started from, with its source
    folder, licence and the sha256 of every file it was built from."""
    return {"name": entry["name"], "stage": "base", "parent": None, "data_sha256": None, "steps": None,
            "seed": None, "lr": None, "warmup_steps": None, "wall_seconds": None, "source": entry["source"],
            "model_type": entry["architecture"]["model_type"], "params": entry["architecture"]["params"],
            "licence": entry["licence"]["name"], "tokenizer_sha256": entry["tokenizer"]["sha256"],
            "files": [{"path": f["path"], "sha256": f["sha256"]} for f in entry["files"]]}
