"""LoRA on our Transformer through peft: wrap, save/restore the adapter, merge into a plain model.

peft's `LoraModel` works on any nn.Module by module name, so no fork of the model is needed. Targets
are every linear layer of attention and MLP; the (tied) embedding stays frozen. Merging returns a
plain `Transformer` whose `.pth` loads anywhere a fully fine-tuned one does.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> nn.Module:
    from peft import LoraConfig, LoraModel

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(LORA_TARGETS),
                        bias="none")
    return LoraModel(model, config, "default")  # freezes everything but the adapters


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if "lora_" in k}


def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    missing = [k for k in lora_state_dict(model) if k not in state]
    if missing:
        raise ValueError(f"adapter state lacks {len(missing)} tensors, e.g. {missing[0]}")
    model.load_state_dict(state, strict=False)


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain fp32 Transformer with the adapters folded into the weights; `model` keeps training. A base held in
    bf16 (`builder sft --bf16 --lora`) is widened first, so the small adapter deltas are not rounded away."""
    return copy.deepcopy(model).float().merge_and_unload()
