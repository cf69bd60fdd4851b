"""Preference tuning: DPO against the frozen SFT model, in the training loop of source/train.py.

Design choices:
- Sigmoid DPO (Rafailov et al., 2023): loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), where
  pi and ref are the summed log-probs of a reply under the policy and under the frozen SFT model. The
  implicit reward of a reply is beta * (pi - ref); the log reports their margin (chosen - rejected) and
  the accuracy of margin > 0.
- The reference never changes, so its log-probs are computed once per pair, before training, in fp32
  with no grad (`reference_logps`), instead of keeping a second model in memory and repeating its forward
  pass at every step. The presets train in fp32 too: at step 0 policy and reference then agree exactly,
  and bf16 noise in a sum over a reply's tokens is of the size of the margins DPO learns.
- A pair is laid out exactly like an SFT example (`to_chat_messages` + `encode_chat`); its log-prob sums
  over the tokens the SFT loss covers: the reply and its <|end|>. Chosen and rejected rows share a batch
  (first the chosen rows, then the rejected, in the same order).
- The loss is `source.train.train`'s `loss_fn`: optimizer, schedule, accumulation, atomic checkpoints,
  resume and metrics are the training loop's own. Batches are a pure function of (seed, step, micro, rank),
  like every BatchSource, so `--resume` is exact.
- Pair files are JSONL: {"prompt": str} or {"messages": [...ending with a user turn]}, "chosen", "rejected",
  optional "context" (SFT passages) and "meta". Errors name file:line and the field, as for SFT files.
- Mined pairs (builder/dpo_mine.py) come from the SFT model's own greedy answers; `mined_pair` is the rule.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from source.config import TrainConfig, apply_overrides, check_fields
from source.sft_format import check_example, load_checked_lines

DPO_RULES = {"beta": (float, 0.0, 100.0, "(]"), "mine_tokens": (int, 1, 4096, "[]"), "chosen_nll": (float, 0.0, 100.0, "[]")}


@dataclass
class DPOConfig:
    beta: float = 0.1  # strength of the pull towards the reference: lower lets the policy move further
    mine_tokens: int = 96  # longest greedy answer generated when mining pairs
    # weight of the chosen replies' own NLL (per token) added to the DPO loss (RPO, Pang et al., 2024). Sigmoid
    # DPO only widens the margin, and lowering both replies does that too: on mined pairs, most of whose
    # chosen replies are quoted answers, it moved probability into refusals (docs/pages/decisions.md)
    chosen_nll: float = 1.0

    def __post_init__(self) -> None:
        check_fields(self, DPO_RULES)


# TrainConfig overrides: small learning rates (the SFT model is already good; DPO nudges it), fp32 (above),
# no weight decay (it would pull the weights towards zero rather than towards the reference)
DPO_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(batch_size=4, seq_len=256, max_steps=40, lr=1e-4, warmup_steps=4, eval_every=20, eval_batches=2,
                 checkpoint_every=20, log_every=5, weight_decay=0.0, precision="fp32"),
    "small": dict(batch_size=8, seq_len=512, max_steps=300, lr=2e-5, warmup_steps=20, eval_every=100,
                  eval_batches=8, checkpoint_every=100, log_every=10, weight_decay=0.0, precision="fp32"),
    "blueprint-700m": dict(batch_size=4, seq_len=4096, grad_accum=8, max_steps=1000, lr=5e-7, warmup_steps=50,
                           eval_every=200, checkpoint_every=200, distributed="fsdp", weight_decay=0.0),
}


def dpo_configs(preset: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[TrainConfig, DPOConfig]:
    """(TrainConfig, DPOConfig) of a preset with `key=value` overrides, each routed by its field name."""
    if preset not in DPO_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(DPO_PRESETS)}")
    own = set(DPO_RULES)
    mine = [o for o in overrides if o.partition("=")[0].strip().replace("-", "_") in own]
    rest = [o for o in overrides if o not in mine]
    return apply_overrides(TrainConfig(**DPO_PRESETS[preset]), rest), apply_overrides(DPOConfig(), mine)


# ----------------------------------------------------------------------------- pair files

def check_pair(obj: Any) -> dict:
    """Validate one preference line; return {"messages" (ending with the user turn), "context"?, "chosen",
    "rejected", "meta"}. Raises ValueError("field: problem")."""
    if not isinstance(obj, dict):
        raise ValueError(f"pair: expected a JSON object, got {type(obj).__name__}")
    if ("prompt" in obj) == ("messages" in obj):
        raise ValueError('prompt: give either "prompt" (a string) or "messages" (a list), '
                         + ("not both" if "prompt" in obj else "neither is present"))
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise ValueError("prompt: must be a non-empty string")
        messages = [{"role": "user", "content": obj["prompt"]}]
    else:
        messages = obj["messages"]
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
                and messages[-1].get("role") != "user":
            raise ValueError(f"messages[{len(messages) - 1}].role: the last message must be the user's "
                             "(the replies are \"chosen\" and \"rejected\")")
    for key in ("chosen", "rejected"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise ValueError(f"{key}: {'missing' if key not in obj else 'must be a non-empty string'}")
    if obj["chosen"].strip() == obj["rejected"].strip():
        raise ValueError("rejected: the same text as chosen, so there is no preference to learn")
    example = {"messages": [*messages, {"role": "assistant", "content": obj["chosen"]}]}
    for key in ("context", "meta"):
        if obj.get(key) is not None:
            example[key] = obj[key]
    checked = check_example(example)  # messages, context and meta follow the SFT rules and error wording
    pair = {"messages": checked["messages"][:-1], "chosen": obj["chosen"], "rejected": obj["rejected"],
            "meta": checked["meta"]}
    if checked.get("context"):
        pair["context"] = checked["context"]
    return pair


def load_pairs(path: str | os.PathLike, skip_bad: bool = False) -> tuple[list[dict], int]:
    """Pairs of a JSONL file. A bad line raises ValueError("file:line: field: problem"), or with `skip_bad`
    is skipped and counted. Returns (pairs, n_bad)."""
    return load_checked_lines(path, check_pair, skip_bad)


# ----------------------------------------------------------------------------- mining rule

def mined_pair(example: dict, answer: str, is_refusal: Callable[[str], bool]) -> tuple[str, dict | None]:
    """(reason, pair or None) for an SFT example and the model's greedy `answer` to it.

    grounded: a refusal ("refused") or any other text than the gold reply ("differs": a garbled or wrong
    copy) -> chosen = gold, rejected = the answer. no-answer: an answer that is not a refusal ("answered")
    -> chosen = the gold refusal. An answer equal to the gold reply, a refusal of a no-answer question and
    other kinds (chit-chat has no single right reply) give no pair."""
    kind, gold = (example.get("meta") or {}).get("kind"), example["messages"][-1]["content"]
    if kind not in ("grounded", "no-answer"):
        return "other-kind", None
    if " ".join(answer.split()) == " ".join(gold.split()):
        return "same", None
    if kind == "grounded":
        reason = "refused" if is_refusal(answer) else "differs"
    elif is_refusal(answer):
        return "refused-ok", None
    else:
        reason = "answered"
    if not answer.strip():
        return "empty", None  # nothing to reject: the answer stopped at once
    pair = {"messages": example["messages"][:-1], "chosen": gold, "rejected": answer,
            "meta": {**(example.get("meta") or {}), "reason": reason}}
    if example.get("context"):
        pair["context"] = example["context"]
    return reason, pair


# ----------------------------------------------------------------------------- batches and the loss

def encode_pair(pair: dict, tokenizer, max_tokens: int) -> tuple[tuple[list[int], list[int]], ...] | None:
    """((chosen ids, mask), (rejected ids, mask)) in the SFT layout, cut to `max_tokens`; None when a cut
    leaves either reply without a supervised token."""
    from source.sft_data import to_chat_messages

    rows = []
    for key in ("chosen", "rejected"):
        example = {"messages": [*pair["messages"], {"role": "assistant", "content": pair[key]}],
                   "context": pair.get("context")}
        ids, mask = tokenizer.encode_chat(to_chat_messages(example), add_generation_prompt=False)
        ids, mask = ids[:max_tokens], mask[:max_tokens]
        if sum(mask[1:]) == 0:
            return None
        rows.append((ids, mask))
    return tuple(rows)


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed log-prob of the masked targets, per row."""
    per_token = -F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return (per_token * mask).sum(-1)


class PairBatches:
    """`BatchSource` of preference pairs: (x, y, mask, ref) with 2B rows, chosen then rejected; `ref` holds
    each row's reference log-prob once `reference_logps` has filled it in."""

    tokens_per_byte = 0.0  # a DPO loss has no bits-per-byte reading

    def __init__(self, pairs: list[dict], tokenizer, seq_len: int, seed: int = 0) -> None:
        encoded = [e for e in (encode_pair(p, tokenizer, seq_len + 1) for p in pairs) if e is not None]
        self.dropped = len(pairs) - len(encoded)
        if not encoded:
            raise ValueError(f"no usable pairs ({len(pairs)} given; a reply cut off at seq_len={seq_len} "
                             "entirely is dropped)")
        # every 10th pair is held out when there are enough; a handful of pairs is both trained and evaluated
        val = [e for i, e in enumerate(encoded) if i % 10 == 9] if len(encoded) >= 20 else encoded
        train = [e for i, e in enumerate(encoded) if i % 10 != 9] if len(encoded) >= 20 else encoded
        self.splits = {"train": train, "val": val}
        self.ref: dict[str, torch.Tensor] = {s: torch.zeros(len(v), 2) for s, v in self.splits.items()}
        self.seed, self.pad_id = seed, tokenizer.eos_id

    def __len__(self) -> int:
        return len(self.splits["train"])

    def rows(self, split: str, picks: list[int]) -> tuple[torch.Tensor, ...]:
        data = self.splits[split]
        seqs = [data[i][0] for i in picks] + [data[i][1] for i in picks]
        width = max(len(ids) for ids, _ in seqs)
        x = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        m = torch.zeros((len(seqs), width), dtype=torch.float32)
        for r, (ids, mask) in enumerate(seqs):
            x[r, :len(ids)], m[r, :len(mask)] = torch.tensor(ids), torch.tensor(mask, dtype=torch.float32)
        ref = self.ref[split][picks]
        return x[:, :-1], x[:, 1:], m[:, 1:], torch.cat([ref[:, 0], ref[:, 1]])

    def batch(self, split: str, batch_size: int, seq_len: int, step: int, micro: int = 0,
              rank: int = 0) -> tuple[torch.Tensor, ...]:
        n = len(self.splits[split])
        if split == "val":  # fixed, in-order: comparable across evaluations
            picks = [(step * batch_size + i) % n for i in range(batch_size)]
        else:
            picks = np.random.default_rng([self.seed, 0, step, micro, rank]).integers(0, n, size=batch_size).tolist()
        return self.rows(split, picks)


@torch.no_grad()
def reference_logps(model: torch.nn.Module, data: PairBatches, batch_size: int = 8) -> None:
    """Fill `data.ref` with the frozen model's log-probs of every pair (fp32, no grad, once)."""
    was_training = model.training
    model.eval()
    for split, pairs in data.splits.items():
        for start in range(0, len(pairs), batch_size):
            picks = list(range(start, min(len(pairs), start + batch_size)))
            x, y, m, _ = data.rows(split, picks)
            logps = sequence_logps(model(x)[0], y, m)
            data.ref[split][start:start + len(picks)] = torch.stack([logps[:len(picks)], logps[len(picks):]], 1)
    model.train(was_training)


def dpo_loss(policy: torch.Tensor, ref: torch.Tensor, beta: float, chosen_nll: float = 0.0,
             chosen_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO over 2B rows (chosen then rejected), plus `chosen_nll` x the chosen replies' mean
    per-token NLL (needs `chosen_tokens`, the supervised tokens per chosen row): (mean loss, stats)."""
    half = policy.size(0) // 2
    rewards = beta * (policy - ref)
    margin = rewards[:half] - rewards[half:]
    loss = -F.logsigmoid(margin).mean()
    stats = {"margin": margin.mean(), "accuracy": (margin > 0).float().mean(),
             "chosen_reward": rewards[:half].mean(), "rejected_reward": rewards[half:].mean()}
    if chosen_nll:
        nll = (-policy[:half] / chosen_tokens.clamp(min=1)).mean()
        loss, stats["chosen_nll"] = loss + chosen_nll * nll, nll
    return loss, {k: v.detach() for k, v in stats.items()}


def make_loss_fn(beta: float, chosen_nll: float = 0.0) -> Callable[[torch.nn.Module, tuple, torch.device], tuple]:
    """The `loss_fn` source.train.train calls with each (x, y, mask, ref) batch."""
    def loss_fn(model: torch.nn.Module, batch: tuple, device: torch.device) -> tuple:
        x, y, mask, ref = (t.to(device) for t in batch)
        logits, _ = model(x)
        return dpo_loss(sequence_logps(logits, y, mask), ref, beta, chosen_nll, mask[:mask.size(0) // 2].sum(-1))
    return loss_fn


@torch.no_grad()
def pair_stats(model: torch.nn.Module, data: PairBatches, split: str, beta: float, batch_size: int = 8) -> dict:
    """Mean DPO loss, reward margin and accuracy of `model` on every pair of a split (no grad, fp32)."""
    was_training = model.training
    model.eval()
    n, sums = len(data.splits[split]), {"loss": 0.0, "margin": 0.0, "accuracy": 0.0}
    for start in range(0, n, batch_size):
        picks = list(range(start, min(n, start + batch_size)))
        x, y, m, ref = data.rows(split, picks)
        loss, stats = dpo_loss(sequence_logps(model(x)[0], y, m), ref, beta)
        for key, value in (("loss", loss), ("margin", stats["margin"]), ("accuracy", stats["accuracy"])):
            sums[key] += float(value) * len(picks)
    model.train(was_training)
    return {"pairs": n, **{k: round(v / n, 6) for k, v in sums.items()}}


def write_pairs(path: str | os.PathLike, pairs: list[dict]) -> None:
    """Atomic JSONL write of pairs, in the format `load_pairs` reads back."""
    from source.sft_format import write_jsonl

    write_jsonl(Path(path), pairs)
