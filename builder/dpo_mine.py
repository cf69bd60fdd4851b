"""Preference pairs mined from the SFT model's own greedy answers on its training questions.

The answers come from the runtime's engine (`runtime_python.chat.generate_stream` over a `TorchBackend`,
greedy), fed the prompt `source.prompt.build_prompt` makes of the example's conversation and passages:
what a user of `supermix` would have seen. `source.dpo.mined_pair` turns each answer into a pair or a
reason for none. Output: pairs.jsonl (the preference file format) and pairs-stats.json (counts per reason).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from source.dpo import mined_pair, write_pairs
from source.files import atomic_write_bytes

PAIRS, STATS = "pairs.jsonl", "pairs-stats.json"


def greedy_answer(backend, example: dict, max_new_tokens: int) -> str:
    """The runtime's greedy reply to an example's conversation up to its last user turn, shown its context."""
    from runtime_python.chat import Reply, generate_stream
    from runtime_python.generation import GenerationConfig
    from source.prompt import build_prompt
    from source.sft_data import DEFAULT_SYSTEM_PROMPT

    messages = example["messages"][:-1]
    budget = max(1, min(max_new_tokens, backend.max_seq_len - 64))  # a long question still leaves room
    prompt = build_prompt(backend.tokenizer, messages, example.get("context") or [], DEFAULT_SYSTEM_PROMPT,
                          budget, backend.max_seq_len)
    gen = GenerationConfig(temperature=0.0, max_new_tokens=budget)
    reply = [r for r in generate_stream(backend, messages, gen, prompt_ids=prompt.ids) if isinstance(r, Reply)][-1]
    return reply.text.strip()  # ready ids keep a first leading space (a raw continuation): not reply text


def mine(model_path: Path, tokenizer_dir: Path, sft_file: Path, n: int, seed: int, max_new_tokens: int,
         out_dir: Path, progress: bool = True) -> dict:
    """Mine pairs from `n` seeded examples of `sft_file`; write OUT/pairs.jsonl and OUT/pairs-stats.json.
    Returns the stats."""
    from tqdm import tqdm

    from runtime_python.backends import TorchBackend
    from source.evaluate import REFUSAL_PATTERN
    from source.files import sha256_file
    from source.sft_batches import read_jsonl

    examples = read_jsonl(sft_file)
    chosen = random.Random(seed).sample(range(len(examples)), min(n, len(examples)))
    backend = TorchBackend.load(model_path, tokenizer_dir)
    pairs, reasons = [], {}
    for i in tqdm(sorted(chosen), desc="mining pairs", unit="q", disable=not progress):
        example = examples[i]
        kind = (example.get("meta") or {}).get("kind")
        answer = greedy_answer(backend, example, max_new_tokens) if kind in ("grounded", "no-answer") else ""
        reason, pair = mined_pair(example, answer, lambda text: bool(REFUSAL_PATTERN.search(text)))
        reasons[reason] = reasons.get(reason, 0) + 1
        if pair is not None:
            pairs.append(pair)
    backend.release()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_pairs(out_dir / PAIRS, pairs)
    stats = {"requested": n, "examples": len(chosen), "pairs": len(pairs), "reasons": dict(sorted(reasons.items())), "seed": seed,
             "max_new_tokens": max_new_tokens, "sft_file": str(sft_file), "sft_sha256": sha256_file(sft_file),
             "model_sha256": sha256_file(model_path)}
    atomic_write_bytes(out_dir / STATS, (json.dumps(stats, indent=2) + "\n").encode())
    return stats


def reusable(out_dir: Path, model_path: Path, sft_file: Path, n: int, seed: int, max_new_tokens: int) -> bool:
    """Whether OUT holds pairs mined from this very model, data and settings (a resumed run reuses them)."""
    from source.files import sha256_file

    try:
        stats = json.loads((out_dir / STATS).read_text())
    except (OSError, ValueError):
        return False
    same = {"requested": n, "seed": seed, "max_new_tokens": max_new_tokens}
    return (out_dir / PAIRS).is_file() and all(stats.get(k) == v for k, v in same.items()) \
        and stats.get("sft_sha256") == sha256_file(sft_file) and stats.get("model_sha256") == sha256_file(model_path)
