"""datasets/eval/natural.jsonl: a valid, balanced hand-written set that never overlaps the chat data.

The SFT generator runs for real (on the tiny workspace's pydoc topics and WordNet slice) and none of
its user turns may be a natural question; a locally built datasets/built/sft is checked too when it
exists (CI has none: it is built data, not committed)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from source.natural_eval import KINDS, UNANSWERABLE, load_items
from source.sft_data import question_key

REPO = Path(__file__).resolve().parent.parent
NATURAL = REPO / "datasets/eval/natural.jsonl"


norm = question_key  # the generator's own key: what it counts as the same question


@pytest.fixture(scope="module")
def items() -> list[dict]:
    return load_items(NATURAL)


def test_the_set_is_large_balanced_and_valid(items):
    kinds = Counter(it["kind"] for it in items)
    assert len(items) >= 400 and set(kinds) == set(KINDS), kinds
    assert kinds["no-answer"] >= 0.15 * len(items)
    assert sum(bool(it["history"]) for it in items) >= 20  # follow-ups
    assert len({norm(it["question"]) for it in items}) == len(items)  # no duplicates
    for it in items:
        assert bool(it["gold"]) == (it["kind"] not in UNANSWERABLE), it["id"]
        assert not it["gold"] or it["facts"], it["id"]
    templated = [it for it in items if re.match(r"(what does \S+ do|tell me about|define)\b", it["question"], re.I)]
    assert len(templated) <= 0.05 * len(items)  # worded the way people type, not like the templates


def _user_turns(examples: list[dict]) -> set[str]:
    return {norm(m["content"]) for ex in examples for m in ex["messages"] if m["role"] == "user"}


def test_no_natural_question_is_training_data(items, tiny_workspace, tiny_index):
    from source.sft_data import generate_examples
    from source.tokenizer import Tokenizer

    train, test = generate_examples(tiny_workspace["data"], tiny_index, seed=0, tokenizer=Tokenizer.load(
        tiny_workspace["tokenizer"]), limits={"pydoc-topics": 200, "wordnet": 200, "chitchat": 0})
    turns = _user_turns(train + test)
    assert len(turns) > 100  # the generator really produced questions
    natural = {norm(it["question"]) for it in items} | {norm(t["content"]) for it in items for t in it["history"]
                                                          if t["role"] == "user"}
    assert not natural & turns
    for split in ("train", "test"):  # the chat data a maintainer built locally, when there is one
        built = REPO / "datasets/built/sft" / f"{split}.jsonl"
        if built.is_file():
            seen = _user_turns([json.loads(line) for line in built.read_text(encoding="utf-8").splitlines()])
            assert not natural & seen, sorted(natural & seen)[:5]
