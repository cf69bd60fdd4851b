"""Model and training configuration: two dataclasses and their named presets.

Presets are plain dictionaries of overrides; the CLI applies `--set key=value` on top. No config
framework: `ModelConfig(**preset)` is the whole mechanism.

The `blueprint-700m` preset follows the original blueprint's depth (24 layers, 16 heads, 8k context,
65k vocab). The blueprint also said "3072 hidden", which at 24 layers is ~2.7B parameters, not 700M;
we keep the 700M target and pick dim 1536 (SwiGLU hidden 4096, 8 kv heads), which gives ~0.72B.

Every field has an allowed range (`MODEL_RULES`, `TRAIN_RULES`), checked when a config is made: by a
preset, by `--set`, or from a checkpoint's own config before a single tensor is allocated. The ranges
reject nonsense (n_heads=0, lr=nan, grad_clip=-1) and sizes nothing here could allocate, not unusual
choices; `MAX_PARAMS` bounds the model as a whole.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

# field: (int | float, low, high, brackets) for numbers, (bool,) for flags, (str, choices) for choices
Rule = tuple
ROPE_SCALINGS = ("none", "linear", "llama3")  # HF rope_scaling types our rotary tables reproduce
MODEL_RULES: dict[str, Rule] = {
    "vocab_size": (int, 2, 1 << 20, "[]"), "dim": (int, 2, 1 << 15, "[]"), "n_layers": (int, 1, 1024, "[]"),
    "n_heads": (int, 1, 1024, "[]"), "n_kv_heads": (int, 1, 1024, "[]"), "ffn_hidden": (int, 1, 1 << 18, "[]"),
    "max_seq_len": (int, 1, 1 << 17, "[]"), "rope_theta": (float, 1.0, 1e12, "(]"),
    "norm_eps": (float, 0.0, 0.1, "(]"), "tie_embeddings": (bool,), "gradient_checkpointing": (bool,),
    "head_dim_override": (int, 0, 1024, "[]"), "qkv_bias": (bool,), "o_bias": (bool,), "mlp_bias": (bool,),
    "rope_scaling": (str, ROPE_SCALINGS), "rope_factor": (float, 0.0, 1e6, "(]"),
    "rope_low_freq_factor": (float, 0.0, 1e6, "(]"), "rope_high_freq_factor": (float, 0.0, 1e6, "(]"),
    "rope_original_max_seq_len": (int, 1, 1 << 24, "[]"),
}
TRAIN_RULES: dict[str, Rule] = {
    "batch_size": (int, 1, 1 << 16, "[]"), "seq_len": (int, 1, 1 << 17, "[]"), "grad_accum": (int, 1, 1 << 16, "[]"),
    "max_steps": (int, 1, 10**9, "[]"), "lr": (float, 0.0, 1.0, "(]"), "min_lr_ratio": (float, 0.0, 1.0, "[]"),
    "warmup_steps": (int, 0, 10**9, "[]"), "weight_decay": (float, 0.0, 1.0, "[]"),
    "beta1": (float, 0.0, 1.0, "[)"), "beta2": (float, 0.0, 1.0, "[)"),
    # 0 would zero every gradient, a negative norm flips them (the run climbed uphill)
    "grad_clip": (float, 0.0, 1e6, "(]"), "precision": (str, ("bf16", "fp32")), "compile": (bool,),
    "seed": (int, 0, 2**63 - 1, "[]"), "eval_every": (int, 1, 10**9, "[]"), "eval_batches": (int, 1, 1 << 20, "[]"),
    "checkpoint_every": (int, 1, 10**9, "[]"), "log_every": (int, 1, 10**9, "[]"),
    "distributed": (str, ("ddp", "fsdp")), "prompt_loss_weight": (float, 0.0, 1.0, "[]"),
}
# 20B parameters (80 GB in fp32): far past any preset (blueprint-700m is 0.72B), far short of the terabytes a
# hostile or mistyped config could ask for before a single weight is compared with it
MAX_PARAMS = 20_000_000_000
MAX_HEAD_DIM = 1024  # bounds the rotary tables, max_seq_len * head_dim floats, as MAX_PARAMS bounds the weights


def _allowed(rule: Rule) -> str:
    if rule[0] is bool:
        return "true or false"
    if rule[0] is str:
        return "one of " + ", ".join(map(repr, rule[1]))
    kind, low, high, brackets = rule
    if kind is int:
        return f"an integer in {brackets[0]}{low}, {high}{brackets[1]}"
    return f"a finite number in {brackets[0]}{low:g}, {high:g}{brackets[1]}"


def _fits(value: Any, rule: Rule) -> bool:
    if rule[0] is bool:
        return isinstance(value, bool)
    if rule[0] is str:
        return isinstance(value, str) and value in rule[1]
    kind, low, high, brackets = rule
    if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
        return False
    if isinstance(value, float) and not math.isfinite(value):  # the ranges reject them too; this keeps it explicit
        return False
    return ((low < value) if brackets[0] == "(" else (low <= value)) and \
        ((value < high) if brackets[1] == ")" else (value <= high))


def check_fields(cfg: Any, rules: dict[str, Rule]) -> None:
    """Raise ValueError("field=value: must be <allowed range>") for the first field outside its rule."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not _fits(value, rules[f.name]):
            raise ValueError(f"{f.name}={value!r:.40}: must be {_allowed(rules[f.name])}")


def estimate_params(cfg: "ModelConfig") -> int:
    """The parameter count of `Transformer(cfg)`, from the config alone (tests check it equals the model's)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    per_layer = 2 * cfg.dim + cfg.dim * (2 * q + 2 * kv) + 3 * cfg.dim * cfg.ffn_hidden
    per_layer += (q + 2 * kv) * cfg.qkv_bias + cfg.dim * cfg.o_bias + (2 * cfg.ffn_hidden + cfg.dim) * cfg.mlp_bias
    return cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2) + cfg.n_layers * per_layer + cfg.dim


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    dim: int = 256
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 4
    ffn_hidden: int = 704  # SwiGLU hidden size, ~8/3 * dim rounded up to a multiple of 64
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    gradient_checkpointing: bool = False
    # Variants of imported Hugging Face bases (source/base_model.py). The defaults are our own models' shape,
    # so checkpoints written before these fields existed load unchanged.
    head_dim_override: int = 0  # HF `head_dim` when it is not dim // n_heads; 0: dim // n_heads
    qkv_bias: bool = False  # biases on q/k/v (Qwen2; Llama's attention_bias)
    o_bias: bool = False  # bias on o_proj (Llama's attention_bias)
    mlp_bias: bool = False  # biases on gate/up/down (Llama's mlp_bias)
    rope_scaling: str = "none"  # HF rope_scaling type: "linear" or "llama3" rescale the rotary frequencies
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_seq_len: int = 8192  # llama3 only: original_max_position_embeddings

    def __post_init__(self) -> None:
        check_fields(self, MODEL_RULES)
        if not self.head_dim_override and self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2 or self.head_dim > MAX_HEAD_DIM:
            raise ValueError(f"head dimension {self.head_dim} must be even (rotary embeddings) and at "
                             f"most {MAX_HEAD_DIM}")
        if (n := estimate_params(self)) > MAX_PARAMS:
            raise ValueError(f"this config has {n:,} parameters; the limit is {MAX_PARAMS:,} "
                             "(check vocab_size, dim, n_layers, ffn_hidden)")

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.dim // self.n_heads


@dataclass
class TrainConfig:
    batch_size: int = 16  # sequences per micro-batch (per process)
    seq_len: int = 256
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "bf16"  # "bf16" (autocast) or "fp32"
    compile: bool = False
    seed: int = 1337
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    log_every: int = 10
    distributed: str = "ddp"  # "ddp" or "fsdp" (FSDP is meant for GPU clusters)
    # SFT only: loss weight of the non-assistant tokens (system, context, user). 0 trains on replies alone;
    # a small weight (OpenAI's old fine-tuning API defaulted to 0.01) also learns from the ~95% of each
    # chat that is prompt, at no extra compute. Val loss stays replies-only either way.
    prompt_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        check_fields(self, TRAIN_RULES)


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # < 1M parameters: for tests and CI
    "tiny": dict(vocab_size=8192, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=192, max_seq_len=256),
    # ~8M parameters: the default champion
    "small": dict(vocab_size=8192, dim=256, n_layers=8, n_heads=8, n_kv_heads=4, ffn_hidden=704, max_seq_len=1024),
    "blueprint-700m": dict(vocab_size=65536, dim=1536, n_layers=24, n_heads=16, n_kv_heads=8, ffn_hidden=4096,
                           max_seq_len=8192, rope_theta=500000.0, gradient_checkpointing=True),
}

TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(batch_size=8, seq_len=128, max_steps=300, lr=3e-3, warmup_steps=20, eval_every=100,
                 eval_batches=4, checkpoint_every=100, log_every=10),
    "small": dict(batch_size=16, seq_len=512, max_steps=6000, lr=2e-3, warmup_steps=200, eval_every=250,
                  eval_batches=16, checkpoint_every=250, log_every=10),
    "blueprint-700m": dict(batch_size=8, seq_len=8192, grad_accum=16, max_steps=100_000, lr=3e-4,
                           warmup_steps=2000, eval_every=1000, checkpoint_every=1000, distributed="fsdp"),
}

# chat fine-tuning: shorter, gentler runs on top of a pretrained model
SFT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(batch_size=8, seq_len=256, max_steps=100, lr=1e-3, warmup_steps=10, eval_every=50,
                 eval_batches=4, checkpoint_every=50, log_every=10, weight_decay=0.0),
    "small": dict(batch_size=16, seq_len=512, max_steps=1500, lr=5e-4, warmup_steps=50, eval_every=250,
                  eval_batches=16, checkpoint_every=250, log_every=10, weight_decay=0.0),
    "blueprint-700m": dict(batch_size=8, seq_len=4096, grad_accum=8, max_steps=5000, lr=5e-5, warmup_steps=100,
                           eval_every=500, checkpoint_every=500, distributed="fsdp", weight_decay=0.0),
}


VARIANT_FIELDS = ("head_dim_override", "qkv_bias", "o_bias", "mlp_bias", "rope_scaling", "rope_factor",
                  "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_seq_len")


def config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The config as a checkpoint and the registry store it: the base-model variant fields only where they differ
    from their defaults, so our own models' configs stay what they were (and older code still reads them)."""
    defaults = ModelConfig()
    return {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in VARIANT_FIELDS or v != getattr(defaults, k)}


def _coerce(value: str, current: Any) -> Any:
    if isinstance(current, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    try:
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
    except ValueError:
        raise ValueError(f"expected {'an integer' if isinstance(current, int) else 'a number'}, got {value!r}") \
            from None
    return value


def apply_overrides(cfg: Any, overrides: list[str] | tuple[str, ...]) -> Any:
    """Return a copy of a config dataclass with `key=value` strings applied (types follow the field)."""
    changes: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cfg)}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key=value")
        if key not in names:
            raise ValueError(f"unknown field {key!r} for {type(cfg).__name__}; known: {', '.join(sorted(names))}")
        try:
            changes[key] = _coerce(value.strip(), getattr(cfg, key))
        except ValueError as exc:
            raise ValueError(f"field {key!r}: {exc}") from None
    return dataclasses.replace(cfg, **changes)


def model_config(preset: str, overrides: list[str] | tuple[str, ...] = ()) -> ModelConfig:
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(MODEL_PRESETS)}")
    return apply_overrides(ModelConfig(**MODEL_PRESETS[preset]), overrides)


def train_config(preset: str, overrides: list[str] | tuple[str, ...] = (), sft: bool = False) -> TrainConfig:
    presets = SFT_PRESETS if sft else TRAIN_PRESETS
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(presets)}")
    return apply_overrides(TrainConfig(**presets[preset]), overrides)


def split_overrides(overrides: list[str] | tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Route `key=value` overrides to ModelConfig or TrainConfig by field name."""
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model_o, train_o = [], []
    for item in overrides:
        key = item.partition("=")[0].strip().replace("-", "_")
        if key in model_fields:
            model_o.append(item)
        elif key in train_fields:
            train_o.append(item)
        else:
            raise ValueError(f"unknown setting {key!r}; model fields: {', '.join(sorted(model_fields))}; "
                             f"train fields: {', '.join(sorted(train_fields))}")
    return model_o, train_o


__all__ = ["ModelConfig", "TrainConfig", "MODEL_PRESETS", "TRAIN_PRESETS", "SFT_PRESETS", "model_config", "train_config",
           "apply_overrides", "split_overrides", "MODEL_RULES", "TRAIN_RULES", "MAX_PARAMS", "check_fields",
           "estimate_params", "ROPE_SCALINGS", "config_dict"]
