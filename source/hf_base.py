"""Bring your own base: check a local Hugging Face model folder and record it in the registry as a base.

    inspect_base(folder)             -> Base (nothing written); BaseError naming the file and field
    import_base(folder, registry)    -> Base, recorded under its name in registry.json's "bases"
    verify_base(base)                -> {file: "ok" | problem}, re-hashed from disk

Design choices:
- Supported: model_type "llama" (tied or untied head, head_dim other than hidden/heads, rope_theta,
  rope_scaling, attention/mlp bias) and "qwen2" (q/k/v bias). Anything else is refused by name.
- The weights are never loaded: each safetensors header is opened lazily (safetensors.safe_open) and every
  tensor the config implies is checked for presence and shape, in a single file or in the shards that
  model.safetensors.index.json names. A tensor the config does not imply is an error too (another
  architecture), except rotary inv_freq buffers that old checkpoints carry.
- Referenced, not copied: a base is often gigabytes and must not enter git, so the entry keeps the folder's
  absolute path and the size and sha256 of every file the model is built from (config, weights, tokenizer,
  template, licence). Later stages re-hash them before use (`verify_base`), so a changed folder is caught.
- The tokenizer is loaded with `HFTokenizer` (tokenizer.json + tokenizer_config.json) and its chat template,
  if any, rendered once, so a folder that imports is one the runtime can chat with. A base without a chat
  template imports (fine-tuning can give it one later); its entry says so.
- Licence: the text of LICENSE/LICENCE/COPYING (any case, .txt/.md) and a name from the model card's
  front matter (`license:` in README.md), else the licence file's first line, else "unknown".
- All checks run before the registry is touched; the entry is added under the registry's writer lock.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from source.files import sha256_file
from source.hf_tokenizer import HFTokenizer, TokenizerError, read_json_object
from source.registry import Registry, RegistryError

SUPPORTED = ("llama", "qwen2")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
RESERVED = re.compile(r"[vV]?\d+|champion|latest")  # would read as a registry version reference
LICENCE = re.compile(r"(licen[cs]e|copying)(\.(txt|md))?", re.IGNORECASE)
OPTIONAL_FILES = ("generation_config.json", "special_tokens_map.json", "chat_template.jinja")


class BaseError(ValueError):
    """A base folder problem; the message names the file and the field."""


@dataclass
class Architecture:
    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int
    rope_theta: float
    rope_scaling: dict | None
    tied_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    params: int = 0
    dtypes: list[str] = field(default_factory=list)


@dataclass
class Base:
    name: str
    source: str  # the folder's absolute path: bases are referenced, not copied
    imported: str  # ISO 8601 UTC
    architecture: dict
    licence: dict  # {name, file, text}
    tokenizer: dict  # {sha256, vocab, bos, eos, chat_template: where it came from or None}
    files: list[dict]  # [{path (relative to source), bytes, sha256}]

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- config.json

def _field(cfg: dict, key: str, kinds: tuple, what: str, where: str, default=...):
    """cfg[key] checked against `kinds` (a bool is not a number here); null takes the default where there is one.
    The error names the file and the field."""
    if key not in cfg or (cfg[key] is None and default is not ...):
        if default is ...:
            raise BaseError(f"{where}: field {key} is missing")
        return default
    value = cfg[key]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise BaseError(f"{where}: {key} must be {what}, got {value!r:.60}")
    return value


def _positive(cfg: dict, key: str, where: str, default=...) -> int:
    value = _field(cfg, key, (int,), "a positive integer", where, default)
    if value < 1:
        raise BaseError(f"{where}: {key} must be a positive integer, got {value}")
    return value


def read_architecture(folder: Path) -> Architecture:
    where = str(folder / "config.json")
    if not (folder / "config.json").is_file():
        raise BaseError(f"{where} not found: not a Hugging Face model folder")
    try:
        cfg = read_json_object(folder / "config.json")
    except TokenizerError as exc:
        raise BaseError(str(exc)) from None
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED:
        raise BaseError(f"{where}: model_type {model_type!r} is not supported ({', '.join(SUPPORTED)})")
    hidden, heads = _positive(cfg, "hidden_size", where), _positive(cfg, "num_attention_heads", where)
    kv_heads = _positive(cfg, "num_key_value_heads", where, heads)
    if heads % kv_heads:
        raise BaseError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if "head_dim" not in cfg and hidden % heads:
        raise BaseError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} "
                        "and there is no head_dim")
    rope_fields(_field(cfg, "rope_scaling", (dict,), "an object or null", where, None), where)
    if (act := cfg.get("hidden_act", "silu")) != "silu":
        raise BaseError(f"{where}: hidden_act {act!r} is not supported (silu)")
    if cfg.get("use_sliding_window"):
        raise BaseError(f"{where}: use_sliding_window true is not supported (full attention only)")
    return Architecture(
        model_type=model_type, layers=_positive(cfg, "num_hidden_layers", where), hidden=hidden, heads=heads,
        kv_heads=kv_heads, head_dim=_positive(cfg, "head_dim", where, hidden // heads),
        intermediate=_positive(cfg, "intermediate_size", where), vocab=_positive(cfg, "vocab_size", where),
        max_positions=_positive(cfg, "max_position_embeddings", where),
        rope_theta=float(_field(cfg, "rope_theta", (int, float), "a number", where, 10000.0)),
        rope_scaling=_field(cfg, "rope_scaling", (dict,), "an object or null", where, None),
        tied_embeddings=_field(cfg, "tie_word_embeddings", (bool,), "true or false", where, False),
        # qwen2 always has q/k/v biases; llama has them (on q/k/v/o) only with attention_bias
        attention_bias=model_type == "qwen2" or _field(cfg, "attention_bias", (bool,), "true or false", where, False),
        mlp_bias=model_type == "llama" and _field(cfg, "mlp_bias", (bool,), "true or false", where, False))


def rope_fields(scaling: dict | None, where: str) -> dict:
    """HF `rope_scaling` as ModelConfig fields: types "linear" and "llama3" (and "default"); others are refused."""
    if not scaling:
        return {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return {}
    if kind not in ("linear", "llama3"):
        raise BaseError(f"{where}: rope_scaling type {kind!r} is not supported (linear, llama3)")
    keys = {"factor": "rope_factor"} | ({"low_freq_factor": "rope_low_freq_factor",
                                        "high_freq_factor": "rope_high_freq_factor",
                                        "original_max_position_embeddings": "rope_original_max_seq_len"}
                                       if kind == "llama3" else {})
    out: dict = {"rope_scaling": kind}
    for key, name in keys.items():
        value = scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise BaseError(f"{where}: rope_scaling.{key} must be a positive number, got {value!r:.40}")
        out[name] = int(value) if name == "rope_original_max_seq_len" else float(value)
    return out


def expected_tensors(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """Every tensor name -> shape that transformers' Llama/Qwen2 classes load for this config."""
    h, q, kv, ffn = arch.hidden, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim, arch.intermediate
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (arch.vocab, h), "model.norm.weight": (h,)}
    if not arch.tied_embeddings:
        out["lm_head.weight"] = (arch.vocab, h)
    for i in range(arch.layers):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
                p + "mlp.down_proj.weight": (h, ffn)}
        if arch.attention_bias:
            out |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,)}
            if arch.model_type == "llama":
                out[p + "self_attn.o_proj.bias"] = (h,)
        if arch.mlp_bias:
            out |= {p + "mlp.gate_proj.bias": (ffn,), p + "mlp.up_proj.bias": (ffn,), p + "mlp.down_proj.bias": (h,)}
    return out


# ----------------------------------------------------------------------------- weights

def weight_files(folder: Path) -> dict[str, list[str]]:
    """{safetensors file name: [tensor names the index maps to it]} ([] for a single model.safetensors)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            data = read_json_object(index)
        except TokenizerError as exc:
            raise BaseError(str(exc)) from None
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise BaseError(f"{index}: weight_map must be an object of tensor name -> file name")
        files: dict[str, list[str]] = {}
        for tensor, name in weight_map.items():
            if "/" in name or "\\" in name or name.startswith("."):
                raise BaseError(f"{index}: weight_map[{tensor!r}] is {name!r}, not a file in this folder")
            files.setdefault(name, []).append(tensor)
        for name in files:
            if not (folder / name).is_file():
                raise BaseError(f"{index}: weight_map names {name}, which is missing from {folder}")
        return files
    if (folder / "model.safetensors").is_file():
        return {"model.safetensors": []}
    found = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pth"))
    hint = f" (found {', '.join(found)}: convert them to safetensors)" if found else ""
    raise BaseError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")


def check_weights(folder: Path, arch: Architecture) -> list[str]:
    """Check every tensor's presence and shape from the safetensors headers; fills arch.params and arch.dtypes.
    Returns the weight file names."""
    from safetensors import SafetensorError, safe_open

    want, files = expected_tensors(arch), weight_files(folder)
    seen: dict[str, str] = {}
    dtypes: set[str] = set()
    for name, mapped in files.items():
        path = folder / name
        try:
            with safe_open(path, framework="pt") as f:
                keys = set(f.keys())
                for tensor in sorted(keys):
                    if tensor in seen:
                        raise BaseError(f"{path}: tensor {tensor} is also in {seen[tensor]}")
                    if tensor not in want and not tensor.endswith("rotary_emb.inv_freq"):
                        raise BaseError(f"{path}: tensor {tensor} is not part of a {arch.model_type} model with "
                                        f"this config.json")
                    seen[tensor] = name
                    if tensor in want:
                        sl = f.get_slice(tensor)
                        shape, dtypes = tuple(sl.get_shape()), dtypes | {sl.get_dtype()}
                        if shape != want[tensor]:
                            raise BaseError(f"{path}: tensor {tensor} has shape {list(shape)}, config.json implies "
                                            f"{list(want[tensor])}")
        except (SafetensorError, OSError) as exc:
            raise BaseError(f"{path}: not a readable safetensors file ({exc})") from None
        if stray := sorted(set(mapped) - keys):
            raise BaseError(f"{folder / 'model.safetensors.index.json'}: maps {stray[0]} to {name}, which lacks it")
    if missing := [t for t in want if t not in seen]:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise BaseError(f"{folder}: tensor {missing[0]}{more} missing from the weights (config.json implies it)")
    arch.params = sum(_numel(shape) for shape in want.values())
    arch.dtypes = sorted(dtypes)
    return list(files)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ----------------------------------------------------------------------------- licence, files, entry

def read_licence(folder: Path) -> dict:
    files = sorted(p for p in folder.iterdir() if p.is_file() and LICENCE.fullmatch(p.name))
    text = files[0].read_text(encoding="utf-8", errors="replace") if files else None
    name = None
    card = folder / "README.md"
    if card.is_file():
        head = card.read_text(encoding="utf-8", errors="replace")
        if head.startswith("---") and (m := re.search(r"^license:\s*(\S.*?)\s*$", head.split("\n---", 1)[0], re.M)):
            name = m.group(1).strip("'\"")
    if name is None and text:
        name = next((ln.strip() for ln in text.splitlines() if ln.strip()), None)
    return {"name": name or "unknown", "file": files[0].name if files else None, "text": text}


def _file_entry(folder: Path, name: str) -> dict:
    path = folder / name
    return {"path": name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def inspect_base(folder: str | Path, name: str | None = None) -> Base:
    """Check `folder` and describe it as a registry base entry; writes nothing. BaseError on any problem."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise BaseError(f"{folder}: not a folder")
    name = folder.name if name is None else name
    if not NAME.fullmatch(name) or RESERVED.fullmatch(name):
        raise BaseError(f"base name {name!r}: use letters, digits, '.', '_' or '-' (at most 64), not a version "
                        "reference like v3, champion or latest; pass --name NAME")
    arch = read_architecture(folder)
    weights = check_weights(folder, arch)
    try:
        tok = HFTokenizer.load(folder)
        if tok.chat_template is not None:  # a template that fails here would fail every chat
            tok.encode_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                             {"role": "assistant", "content": "A"}, {"role": "user", "content": "U"}])
    except ValueError as exc:
        raise BaseError(str(exc)) from None
    if tok.vocab_size > arch.vocab:
        raise BaseError(f"{folder / 'tokenizer.json'}: ids up to {tok.vocab_size - 1}, but config.json: vocab_size is "
                        f"{arch.vocab}")
    licence = read_licence(folder)
    used = ["config.json", *(["model.safetensors.index.json"] if weights != ["model.safetensors"] else []),
            *sorted(weights), "tokenizer.json", "tokenizer_config.json",
            *(f for f in OPTIONAL_FILES if (folder / f).is_file()), *([licence["file"]] if licence["file"] else [])]
    return Base(name=name, source=str(folder), imported=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                architecture=asdict(arch), licence=licence,
                tokenizer={"sha256": tok.sha256, "vocab": tok.vocab_size, "bos": tok.template_vars.get("bos_token"),
                           "eos": tok.template_vars["eos_token"],
                           "chat_template": tok.template_source if tok.chat_template is not None else None},
                files=[_file_entry(folder, f) for f in used])


def import_base(folder: str | Path, registry: Registry, name: str | None = None) -> Base:
    """Check `folder` and record it in `registry` as base `name` (default: the folder's name)."""
    base = inspect_base(folder, name)

    def add(bases: dict) -> None:
        if base.name in bases:
            raise RegistryError(f"{registry.path}: a base named {base.name!r} exists (from "
                                f"{bases[base.name]['source']}); pass another --name or remove it first")
        bases[base.name] = base.to_dict()

    registry.edit_bases(add)
    return base


def verify_base(base: dict) -> dict[str, str]:
    """{file: "ok" | problem} for every file of a base entry, re-hashed from its source folder."""
    folder, report = Path(base["source"]), {}
    for f in base["files"]:
        p = folder / f["path"]
        size = p.stat().st_size if p.is_file() else None
        report[f["path"]] = ("missing" if size is None else
                             f"{size:,} bytes, registry says {f['bytes']:,}" if size != f["bytes"] else
                             "sha256 differs from the registry" if sha256_file(p) != f["sha256"] else "ok")
    return report


def get_base(registry: Registry, name: str) -> dict:
    """A base's registry entry by name; RegistryError names the known ones."""
    bases = registry.load()["bases"]
    if name not in bases:
        raise RegistryError(f"{registry.path}: no base {name!r} (known: {', '.join(sorted(bases)) or 'none'})")
    return bases[name]


def remove_base(registry: Registry, name: str) -> dict:
    """Forget a base (its folder is not touched); returns the entry."""
    removed: dict = {}

    def drop(bases: dict) -> None:
        if name not in bases:
            raise RegistryError(f"{registry.path}: no base {name!r} (known: {', '.join(sorted(bases)) or 'none'})")
        removed.update(bases.pop(name))

    registry.edit_bases(drop)
    return removed
