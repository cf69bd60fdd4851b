"""How the SFT generator asks: how-to tasks from API leads, requests, casual typing, follow-ups whose
passages are what the runtime retrieves for the whole conversation, and the natural set kept out.
Real corpus (pydoc topics + WordNet), real index, real tokenizer."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from source.prompt import retrieval_query
from source.retrieval import Index
from source.sft_data import generate_examples, question_key
from source.sft_phrasing import REQUESTS, casual, howto_task
from source.sft_templates import K
from source.tokenizer import Tokenizer

LIMITS = {"pydoc-topics": 200, "wordnet": 600, "docstrings": 0, "python-docs": 0, "foldoc": 0, "chitchat": 150}
VERBS = {"return", "pad", "create", "check", "remove", "serialize", "handle", "open", "get"}


@pytest.fixture(scope="module")
def generated(tiny_workspace, tiny_index):
    stats: Counter = Counter()
    train, test = generate_examples(tiny_workspace["data"], tiny_index, seed=1, limits=LIMITS,
                                    tokenizer=Tokenizer.load(tiny_workspace["tokenizer"]), max_tokens=384,
                                    stats=stats)
    return train + test, stats


def _users(example: dict) -> list[str]:
    return [m["content"] for m in example["messages"] if m["role"] == "user"]


def test_howto_task_turns_an_api_lead_into_the_task_people_type():
    assert howto_task("Pad a numeric string with zeros on the left, to fill a field.", VERBS) == \
        "pad a numeric string with zeros on the left"
    assert howto_task("Return a random element from the non-empty sequence seq.", VERBS) == \
        "get a random element from the non-empty sequence seq"
    assert howto_task("Return True if the object is a frame object, else False.", VERBS) == \
        "check if the object is a frame object"
    assert howto_task("Returns the ``str`` form of *obj*. More text follows.", VERBS) == "get the str form of obj"
    assert howto_task("Removes the directory; it must be empty.", VERBS) == "remove the directory"
    # noun phrases are not tasks: "Handler for ...", a first word WordNet has no verb for, too short
    assert howto_task("Handler for call events.", VERBS) is None
    assert howto_task("Standard deviation of the normal distribution.", VERBS) is None
    assert howto_task("A generic version of Generator.", VERBS) is None
    assert howto_task("Open it.", VERBS) is None
    # a clause cut inside brackets or quotes would read as garbage
    assert howto_task("Close all file descriptors in [fd_low, fd_high), ignoring errors.", VERBS) is None


def test_casual_typing_varies_the_question_but_never_the_thing_asked_about():
    rng = random.Random(0)
    outs = [casual("What does the word ephemeral mean in everyday English?", rng, protect="ephemeral")
            for _ in range(400)]
    assert all("ephemeral" in q.lower() for q in outs)
    assert sum(q == q.lower() for q in outs) > 150 and sum(not q.rstrip().endswith("?") for q in outs) > 100
    typos = [q for q in outs if not {"what", "does", "word", "mean", "everyday", "english"} <= set(re.findall(r"\w+", q.lower()))]
    assert 20 < len(typos) < 200  # sometimes a slip of the fingers, in an ordinary word


def test_questions_come_in_the_forms_people_use(generated):
    examples, _ = generated
    grounded = [e for e in examples if e["meta"]["kind"] == "grounded"]
    asked = [_users(e)[-1] for e in grounded]
    forms = [re.compile(re.escape(f).replace(r"\{x\}", ".+") + "$", re.I)
             for kind in ("word", "topic") for f in REQUESTS[kind]]
    requests = [q for q in asked if any(f.match(q) or f.match(q + "?") for f in forms)]
    assert len(requests) > 0.15 * len(asked)
    assert sum(q == q.lower() and not q.endswith("?") for q in asked) > 0.15 * len(asked)


def test_follow_ups_are_answered_from_what_the_runtime_retrieves_for_the_conversation(generated, tiny_index):
    examples, _ = generated
    follow = [e for e in examples if e["meta"].get("followup")]
    assert all(len(_users(e)) == 2 for e in follow)
    assert sum(e["meta"]["kind"] == "grounded" for e in follow) >= 5
    index = Index(tiny_index)
    try:
        for e in examples:
            if e["meta"]["kind"] != "grounded" or not e.get("context"):
                continue
            shown = {c["id"] for c in e["context"]}
            retrieved = {p.id for p in index.search(retrieval_query(e["messages"][:-1]), K)}
            gold = e["meta"]["gold"]
            # every passage but the gold is one the runtime would show for the same messages
            assert shown - {gold} <= retrieved, (e["messages"], shown, retrieved)
    finally:
        index.close()


def test_held_out_questions_are_never_asked(tiny_workspace, tiny_index, generated):
    examples, _ = generated
    asked = Counter(question_key(q) for e in examples for q in _users(e))
    common = [q for q, _ in asked.most_common(3)]
    stats: Counter = Counter()
    train, test = generate_examples(tiny_workspace["data"], tiny_index, seed=1, limits=LIMITS,
                                    tokenizer=Tokenizer.load(tiny_workspace["tokenizer"]), max_tokens=384,
                                    stats=stats, held_out=set(common))
    again = {question_key(q) for e in train + test for q in _users(e)}
    assert not again & set(common)
    assert sum(v for k, v in stats.items() if k.startswith("natural_question:")) > 0
