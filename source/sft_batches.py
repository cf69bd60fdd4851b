"""Chat fine-tuning batches: encoded conversations, loss on assistant tokens only.

Each example (see sft_data.py) becomes `encode_chat(to_chat_messages(example))` ids plus the
assistant mask, cut to `seq_len + 1` tokens. A batch pads to its longest example (not to `seq_len`), so
short chats cost little; padding positions carry mask 0 and never reach the loss.

With `prompt_loss_weight` w > 0 the train mask is a float weight instead: 1 on assistant tokens, w on
the rest of the chat, 0 on padding (the val mask stays 0/1, so val loss is comparable across runs).

Like token_data.TokenShards, batch contents are a pure function of (seed, step, micro, rank), which is
what makes `--resume` exact without any data-loader state.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def encode_examples(examples: list[dict], tokenizer, max_tokens: int) -> list[tuple[list[int], list[int]]]:
    from source.sft_data import to_chat_messages

    encoded = []
    for ex in examples:
        ids, mask = tokenizer.encode_chat(to_chat_messages(ex), add_generation_prompt=False)
        ids, mask = ids[:max_tokens], mask[:max_tokens]
        if sum(mask[1:]) > 0:  # an example whose reply was cut off entirely teaches nothing
            encoded.append((ids, mask))
    return encoded


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: invalid JSON ({exc.msg})") from None
    return rows


class ChatBatches:
    """`BatchSource` over `train.jsonl` / `test.jsonl` of an SFT data folder."""

    def __init__(self, sft_dir: str | Path, tokenizer, seq_len: int, seed: int = 0, prompt_loss_weight: float = 0.0):
        sft_dir = Path(sft_dir)
        self.seed, self.pad_id, self.prompt_loss_weight = seed, tokenizer.eos_id, prompt_loss_weight
        self.splits: dict[str, list[tuple[list[int], list[int]]]] = {}
        for split, name in (("train", "train.jsonl"), ("val", "test.jsonl")):
            path = sft_dir / name
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no SFT data; run `builder sft-data` first")
            self.splits[split] = encode_examples(read_jsonl(path), tokenizer, seq_len + 1)
            if not self.splits[split]:
                raise ValueError(f"{path}: no usable examples (each needs an assistant reply)")
        # bits-per-byte over the supervised (assistant) tokens of the val split
        n_tok = sum(sum(m[1:]) for _, m in self.splits["val"])
        n_bytes = sum(len(tokenizer.decode([i for i, m in zip(ids, mask) if m]).encode()) for ids, mask in self.splits["val"])
        self.tokens_per_byte = n_tok / max(1, n_bytes)

    def __len__(self) -> int:
        return len(self.splits["train"])

    def batch(self, split: str, batch_size: int, seq_len: int, step: int, micro: int = 0,
              rank: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        data = self.splits[split]
        salt = 0 if split == "train" else 1
        rng = np.random.default_rng([self.seed, salt, step, micro, rank])
        if split == "val":  # fixed, in-order val batches: comparable across evaluations
            start = (step * batch_size) % len(data)
            picks = [(start + i) % len(data) for i in range(batch_size)]
        else:
            picks = rng.integers(0, len(data), size=batch_size).tolist()
        rows = [data[i] for i in picks]
        width = max(len(ids) for ids, _ in rows)
        x = torch.full((batch_size, width), self.pad_id, dtype=torch.long)
        weighted = split == "train" and self.prompt_loss_weight > 0
        m = torch.zeros((batch_size, width), dtype=torch.float32 if weighted else torch.long)
        for r, (ids, mask) in enumerate(rows):
            x[r, :len(ids)] = torch.tensor(ids)
            m[r, :len(mask)] = torch.tensor(mask)
            if weighted:
                m[r, :len(mask)] += self.prompt_loss_weight * (1 - m[r, :len(mask)])
        # targets are the next token; the mask follows the target position
        return x[:, :-1], x[:, 1:], m[:, 1:]
