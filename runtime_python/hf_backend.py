"""HFBackend: any local transformers causal-LM folder behind the ChatBackend protocol.

Design choices:
- A folder with config.json and no .pth (`is_hf_folder`) is a Hugging Face model: `supermix --model DIR`
  loads it with `AutoModelForCausalLM.from_pretrained(local_files_only=True)`; nothing is downloaded, no
  remote code runs. Its own tokenizer.json and chat template (`source.hf_tokenizer.HFTokenizer`) build the
  prompt, so the chat engine, sampling, retrieval and the API drive it unchanged.
- prefill/decode call the model the way `generate` does (an all-ones attention mask, the past_key_values
  of the previous call, logits of the last position only), so greedy decoding gives `generate(do_sample=
  False)`'s tokens (tested).
- The tokenizer is loaded first: a folder without tokenizer.json fails in a second, not after the weights.
- Logits are cut to the tokenizer's vocabulary: models often pad their embedding past it (to a multiple of
  64 or 128), and an id the tokenizer cannot decode must never be sampled.
- dtypes: fp32 (default) and bf16; int8 is the torch backend's own kernel, not offered here.
- No prompt cache: every prefill runs the whole prompt (the engine reports 0 cached tokens).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from runtime_python.backends import check_prompt
from source.hf_tokenizer import HFTokenizer

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def is_hf_folder(path: str | Path) -> bool:
    """A Hugging Face model folder: config.json and no .pth beside it (a `.pth` folder is ours)."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and not any(path.glob("*.pth"))


class HFBackend:
    """A transformers causal LM (batch 1) with its KV cache from the last prefill/decode."""

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu", dtype: str = "fp32",
                 name: str | None = None) -> None:
        from transformers import AutoModelForCausalLM  # slow to import: only when an HF folder is asked for

        folder = Path(folder)
        if dtype not in TORCH_DTYPES:
            raise ValueError(f"--dtype {dtype} is not available for a Hugging Face model ({' or '.join(TORCH_DTYPES)})")
        self.tokenizer = HFTokenizer.load(folder)
        if self.tokenizer.chat_template is None:
            raise ValueError(f"{folder / 'tokenizer_config.json'}: no chat_template (and no chat_template.jinja), so "
                             "there is no way to lay out a chat for this model")
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=TORCH_DTYPES[dtype])
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{folder}: transformers cannot load it as a causal LM: {exc}") from None
        self.model = model.to(device).eval()
        vocab = int(model.config.vocab_size)
        if self.tokenizer.vocab_size > vocab:
            raise ValueError(f"{folder / 'tokenizer.json'}: ids up to {self.tokenizer.vocab_size - 1}, but the model "
                             f"has only {vocab} embeddings")
        self.name, self.dtype, self.device = name or folder.resolve().name, dtype, self.model.device
        window = getattr(model.config, "max_position_embeddings", None)
        if not isinstance(window, int):
            raise ValueError(f"{folder / 'config.json'}: no max_position_embeddings, so the context size is unknown")
        self.max_seq_len = window
        # what generate() passes when the model takes it: the logits of the last position only
        self._keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        self._past = None
        self._length = 0

    def _forward(self, ids: list[int]) -> torch.Tensor:
        total = self._length + len(ids)
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids], device=self.device),
                             attention_mask=torch.ones(1, total, dtype=torch.long, device=self.device),
                             past_key_values=self._past, use_cache=True, **self._keep)
        self._past, self._length = out.past_key_values, total
        return out.logits[0, -1, :self.tokenizer.vocab_size].float()

    # -- the protocol

    def prefill(self, ids: list[int]) -> torch.Tensor:
        check_prompt(ids, self.max_seq_len, released=self.model is None)
        self._past, self._length = None, 0
        return self._forward(list(ids))

    def decode(self, token_id: int) -> torch.Tensor:
        if self.model is None:
            raise RuntimeError("this backend was released")
        if self._past is None:
            raise RuntimeError("decode() before prefill()")
        if self._length >= self.max_seq_len:
            raise ValueError(f"the model's window of {self.max_seq_len} tokens is full")
        return self._forward([token_id])

    def release(self) -> None:
        self.model = self._past = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
