"""Evaluation: bits-per-byte on held-out text, grounded QA with citations, refusals, fixed samples.

- bits-per-byte: mean next-token loss over contiguous windows of the corpus' val split, divided by
  ln 2 and by bytes per token, so models with different tokenizers compare fairly.
- grounded QA (held-out entities of the SFT test split, kind "grounded"): the greedy answer must
  contain the key fact — normalized content-word recall of the reference answer >= `recall_threshold`
  — and cite the gold passage's number `[k]`. `grounded_qa` is the share of items passing both.
- refusal accuracy (kind "no-answer"): the answer says it does not know.
- samples: fixed prompts answered with retrieval (when an index is given), saved verbatim.
- Every answer is generated from `source.prompt.build_prompt` (the runtime's layout and token budget:
  old turns, then passage text, then the start of the question give way) and its citations are
  parsed by `source.prompt.cited_numbers`, so eval scores the prompts users' models are sent.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np
import torch

from source.model import Transformer
from source.prompt import build_prompt, cited_numbers
from source.sft_data import DEFAULT_SYSTEM_PROMPT

SAMPLE_PROMPTS = ("What does json.dumps do?", "Define ephemeral.", "What is a closure in programming?",
                  "How does the for statement work in Python?", "Hi! How are you today?")
REFUSAL_PATTERN = re.compile(r"\b(don't know|do not know|not sure|can't find|cannot find|no information|"
                             r"don't have|do not have|doesn't say|do not say|don't say|don't cover|do not cover)\b", re.I)
STOP_WORDS = frozenset("a an the of to and or in on for is are was be by with as at it its this that from "
                       "which into than then can will not no".split())


def content_words(text: str) -> list[str]:
    text = re.sub(r"\[\d+\]", " ", text.lower())
    return [w for w in re.findall(r"[a-z0-9_]+", text) if w not in STOP_WORDS]


def fact_recall(answer: str, reference: str) -> float:
    ref = set(content_words(reference))
    return len(ref & set(content_words(answer))) / len(ref) if ref else 0.0


@torch.no_grad()
def bits_per_byte(model: Transformer, token_dir: str | Path, seq_len: int = 256, max_windows: int = 64,
                  batch_size: int = 8) -> dict:
    from source.token_data import TokenShards

    shards = TokenShards(token_dir)
    data = shards.splits["val"]
    n_windows = min(max_windows, (len(data) - 1) // seq_len)
    if n_windows < 1:
        raise ValueError(f"{token_dir}: val split too small for seq_len={seq_len}")
    model.eval()
    total, count = 0.0, 0
    for start in range(0, n_windows, batch_size):
        rows = range(start, min(n_windows, start + batch_size))
        w = torch.from_numpy(np.stack([data[r * seq_len: r * seq_len + seq_len + 1] for r in rows]).astype(np.int64))
        _, loss = model(w[:, :-1], w[:, 1:])
        total += float(loss) * w[:, 1:].numel()
        count += w[:, 1:].numel()
    nats = total / count
    return {"val_loss": nats, "val_bpb": nats / math.log(2) * shards.tokens_per_byte, "val_tokens": count}


def reply(model: Transformer, tokenizer, messages: list[dict], passages: list | None = None,
          max_new_tokens: int = 64, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """Greedy answer to `messages` (ending with a user turn) shown `passages`, through the runtime's prompt."""
    prompt = build_prompt(tokenizer, messages, passages or [], system_prompt, max_new_tokens, model.cfg.max_seq_len)
    # ours: <|end|> and EOS, as always; an imported base's template has its own end tokens: every special token
    # ends a reply there, as in the chat engine
    stops = ((tokenizer.special_ids["end"], tokenizer.eos_id) if "end" in tokenizer.special_ids else
             tuple({tokenizer.eos_id, tokenizer.bos_id, *tokenizer.special_ids.values()} - {None}))
    out = model.generate(prompt.ids, max_new_tokens, stop_ids=stops)
    return tokenizer.decode(out).strip()


def grounded_qa(model: Transformer, tokenizer, examples: list[dict], limit: int = 200,
                recall_threshold: float = 0.5, progress: bool = True) -> dict:
    from tqdm import tqdm

    model.eval()
    grounded = [e for e in examples if e.get("meta", {}).get("kind") == "grounded"][:limit]
    refusals = [e for e in examples if e.get("meta", {}).get("kind") == "no-answer"][:max(1, limit // 4)]
    items, fact_ok, cite_ok, both_ok, refused_ok = [], 0, 0, 0, 0
    for ex in tqdm(grounded + refusals, desc="grounded QA", disable=not progress):
        reference = ex["messages"][-1]["content"]
        answer = reply(model, tokenizer, ex["messages"][:-1], ex.get("context"))
        item = {"question": ex["messages"][-2]["content"], "answer": answer, "reference": reference,
                "kind": ex["meta"]["kind"]}
        if ex["meta"]["kind"] == "grounded":
            gold = [i for i, p in enumerate(ex.get("context", []), 1) if p["id"] == ex["meta"].get("gold")]
            recall = fact_recall(answer, reference)
            fact, cite = recall >= recall_threshold, bool(gold) and gold[0] in cited_numbers(answer)
            fact_ok, cite_ok, both_ok = fact_ok + fact, cite_ok + cite, both_ok + (fact and cite)
            item.update(recall=round(recall, 3), fact=fact, cited=cite)
        else:
            item["refused"] = bool(REFUSAL_PATTERN.search(answer))
            refused_ok += item["refused"]
        items.append(item)
    n, r = max(1, len(grounded)), max(1, len(refusals))
    return {"grounded_qa": both_ok / n, "fact_recall_pass": fact_ok / n, "citation_accuracy": cite_ok / n,
            "refusal_accuracy": refused_ok / r if refusals else None, "n_grounded": len(grounded),
            "n_refusal": len(refusals), "recall_threshold": recall_threshold, "items": items}


def sample_conversations(model: Transformer, tokenizer, index=None, prompts=SAMPLE_PROMPTS, k: int = 3) -> list[dict]:
    from source.sft_data import prepare_context

    out = []
    for prompt in prompts:
        t0 = time.perf_counter()
        # clipped exactly like the training contexts
        passages = prepare_context(index.search(prompt, k)) if index is not None else []
        answer = reply(model, tokenizer, [{"role": "user", "content": prompt}], passages, max_new_tokens=80)
        out.append({"prompt": prompt, "answer": answer, "sources": [f"{p['id']} ({p['title']})" for p in passages],
                    "seconds": round(time.perf_counter() - t0, 3)})
    return out
