"""SFT data: chat examples for fine-tuning, generated from the built corpus or brought by users.

Design choices:
- One example format (JSONL): {"messages": [...], "context": [passages] (optional), "meta": {...}}.
  `to_chat_messages` is the one place that lays an example out for the chat template: training
  (sft_batches) and the runtime both call it, so the model sees the same layout in both.
- Copy, don't invent: every answer is one or two sentences lifted from the gold passage (docstring
  summary, WordNet gloss, FOLDOC first sentence, first prose of a doc section), quoted verbatim after
  the entity's name ("json.dumps: Serialize ..."), ending with the gold's citation marker. An 8M model
  can learn copy-and-cite; it cannot learn to state facts it was never shown, and it garbled the
  rephrased answers ("f returns x") that earlier versions trained on.
- The context is what the runtime gives: the top-3 retrieval hits for the question, passages
  clipped to PASSAGE_CHARS (`prepare_context`). A hit on another chunk of the gold record is
  swapped for the gold chunk; a miss inserts the gold at a random position. Retrieval ranks the
  gold first most of the time, so a share of examples shuffles the order: the model must read the
  sources to cite, not always write [1].
- Asked the way people type: besides each source's templates, source.sft_phrasing asks the same
  answer as requests ("explain X to me"), as how-to tasks derived from an API's lead that do not name
  it, casually (lower case, no "?", typos, fillers) and as follow-ups ("what about X?") after another
  exchange. Passages are what the runtime retrieves for the whole conversation (retrieval_query).
  The natural evaluation set's questions are never generated (`natural_questions`).
- No-answer examples: the same kinds of questions with every passage of the entity removed (its
  record, its title, its name as another class's method, any passage naming it or repeating its
  text); the reply is a fixed "I don't know" phrasing.
- The test split is by entity and seed-independent: sha256(entity) puts ~5% of entities in test
  only, so an evaluation set stays comparable across rebuilds and no test entity is asked about
  in train. All sampling is seeded per source: one source's limit does not move the others.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from collections import Counter, defaultdict
from pathlib import Path

from tqdm import tqdm

from source.corpus.build import iter_records
from source.files import atomic_write_bytes
from source.sft_format import from_instruction, load_examples, write_jsonl
from source.sft_phrasing import FOLLOWUPS, casual, varied_questions
from source.sft_templates import (K, QA_BUILDERS, candidates, chitchat_turns, cite, grounded_context,
                                  no_answer_context)
from source.tokenizer import defuse_special_tokens, format_context

DEFAULT_SYSTEM_PROMPT = ("You are Supermix, a small assistant for Python and computing. Answer briefly and cite "
                         "the numbered sources like [1]. If the sources do not answer the question, say you "
                         "don't know.")
NO_ANSWER_REPLIES = ("I don't know — the sources I have don't cover that.",
                     "I don't know. The sources don't answer that question.",
                     "Sorry, I don't know: none of the sources mention it.",
                     "The sources I have don't say, so I don't know.")
KINDS = ("grounded", "no-answer", "chitchat", "user", "helper")
PASSAGE_CHARS = 450  # three passages + prompt + answer fit in MAX_TOKENS
MAX_TOKENS = 512
TEST_FRACTION = 0.05
# ~40k examples: QA questions per source (of which NO_ANSWER_SHARE become no-answer) + chit-chat windows
DEFAULT_LIMITS = {"docstrings": 9000, "pydoc-topics": 600, "python-docs": 7000, "wordnet": 10000,
                  "foldoc": 8000, "chitchat": 5500}
_CITATION = re.compile(r" ?\[[0-9]+\]")  # ASCII digits, like the JS port (web_static/prompt.js)
NO_ANSWER_SHARE, SHUFFLE_SHARE, FOLLOWUP_SHARE = 0.12, 0.4, 0.08
CASUAL_SHARE, TOPIC_FOLLOWUP_SHARE = 0.6, 0.08  # typed in a hurry; "what about X?" after another question
NATURAL_SET = Path(__file__).resolve().parent.parent / "datasets/eval/natural.jsonl"
# the runtime retrieves for every message, small talk included: most chit-chat shows passages it ignores
CHITCHAT_CONTEXT_SHARE = 0.6


# ----------------------------------------------------------------------------- the example format

def to_chat_messages(example: dict, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> list[dict]:
    """[system] + earlier turns + [context] (if any) + last user turn + [assistant reply if present]."""
    if "messages" not in example and "instruction" in example:
        example = from_instruction(example)
    # defused as the runtime defuses them (source.prompt): a reply that copies "<|end|>" is text, not a turn
    msgs = [{"role": m["role"], "content": defuse_special_tokens(m["content"])} for m in example["messages"]]
    if not msgs or msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
    users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
    if not users:
        raise ValueError("an example needs at least one user message")
    for m in msgs[:users[-1]]:  # earlier replies cite passages that are no longer shown
        if m["role"] == "assistant":
            m["content"] = _CITATION.sub("", m["content"])
    if example.get("context"):
        msgs.insert(users[-1], {"role": "context", "content": format_context(example["context"])})
    return msgs


def clip_text(text: str, max_chars: int) -> str:
    """`text` cut at a word boundary to at most `max_chars` characters, " ..." marking the cut."""
    text = text.strip()
    if len(text) <= max_chars:
        return text
    cut = text.rfind(" ", 0, max_chars - 3)
    cut = cut if cut > max_chars // 2 else max_chars - 4
    return text[:cut].rstrip() + " ..."


def prepare_context(passages: list, max_chars: int = PASSAGE_CHARS) -> list[dict]:
    """Retrieval passages (Passage or dict) -> the context list of an example, texts clipped.

    The runtime should call this too, so it shows the model passages shaped like the training ones."""
    out = []
    for p in passages:
        d = p if isinstance(p, dict) else p.to_dict()
        out.append({"id": d.get("id", ""), "title": d.get("title", ""), "source": d.get("source", ""),
                    "text": clip_text(d.get("text", ""), max_chars)})
    return out


def is_test_entity(entity: str, fraction: float = TEST_FRACTION) -> bool:
    h = hashlib.sha256(f"sft-test:{entity.strip().lower()}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


# ----------------------------------------------------------------------------- context + token budget

def _span_end(text: str, span: str) -> int:
    """Where the verbatim `span` (whitespace-normalized) ends inside `text`; len(text) if not found."""
    words = span.split()
    if words:
        words[-1] = words[-1].rstrip(".:")  # lead() may have turned a final ":" into "."
    m = re.search(r"\s+".join(map(re.escape, words)), text) if words else None
    return m.end() if m else len(text)


def fit_budget(example: dict, passages: list, tokenizer, max_tokens: int, gold_pos: int = 0,
               need: int = 0) -> bool:
    """Set example["context"] from `passages`, clipping texts until the example fits `max_tokens`.

    Other passages shrink first; the gold (1-based `gold_pos`) never below `need` characters (the
    text the answer copies). Without a tokenizer, passages are clipped to PASSAGE_CHARS only."""
    caps = [PASSAGE_CHARS] * len(passages)
    if gold_pos:
        caps[gold_pos - 1] = max(PASSAGE_CHARS, need + 4)
    for _ in range(12):
        if passages:
            example["context"] = [{**c, "text": clip_text(p.text if hasattr(p, "text") else p["text"], cap)}
                                  for c, p, cap in zip(prepare_context(passages), passages, caps)]
        if tokenizer is None:
            return True
        ids, _ = tokenizer.encode_chat(to_chat_messages(example), add_generation_prompt=False)
        if len(ids) <= max_tokens:
            return True
        if not passages:
            return False
        caps = [max(need + 4 if i == gold_pos - 1 else 60, int(c * 0.8)) for i, c in enumerate(caps)]
    return False


# ----------------------------------------------------------------------------- offline generation

def load_records(data_dir) -> dict[str, list[dict]]:
    seen, by_source = set(), defaultdict(list)
    for split in ("train", "val"):
        for r in iter_records(data_dir, split):
            if r["id"] not in seen:  # weight > 1 repeats a record under the same id
                seen.add(r["id"])
                by_source[r["source"]].append(r)
    return by_source


def scaled_limits(limits: dict | None = None, total: int | None = None) -> dict:
    """DEFAULT_LIMITS overridden by `limits`, then scaled so they sum to about `total`."""
    out = {**DEFAULT_LIMITS, **(limits or {})}
    if total is not None:
        f = total / max(1, sum(out.values()))
        out = {k: (max(1, round(v * f)) if v else 0) for k, v in out.items()}
    return out


def question_key(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def natural_questions(path: Path = NATURAL_SET) -> set[str]:
    """The evaluation set's questions and history turns (question_key form): never asked in training."""
    from source.natural_eval import load_items

    if not path.is_file():
        return set()
    return {question_key(t) for item in load_items(path)
            for t in [item["question"]] + [m["content"] for m in item["history"] if m["role"] == "user"]}


def generate_examples(data_dir, index_path, seed: int = 0, limits: dict | None = None, tokenizer=None,
                      max_tokens: int = MAX_TOKENS, progress: bool = False,
                      stats: Counter | None = None, held_out: set[str] | None = None) -> tuple[list[dict], list[dict]]:
    """Grounded, no-answer and chit-chat examples from a built corpus + its retrieval index.

    `limits` maps a source to its number of examples (see DEFAULT_LIMITS; 0 turns a source off).
    `tokenizer` (a source.tokenizer.Tokenizer) enforces `max_tokens`; without one passages are
    only clipped to PASSAGE_CHARS. Skip counts go into `stats` when given. Questions whose
    question_key is in `held_out` (default: the natural evaluation set's) are never asked.
    Returns (train, test)."""
    from source.retrieval import Index

    limits = scaled_limits(limits)
    stats = stats if stats is not None else Counter()
    index = Index(index_path)
    by_source = load_records(data_dir)
    held_out = natural_questions() if held_out is None else held_out
    # "Handle a request" is a task, "Handler for call events" is not: WordNet's verbs tell them apart
    verbs = {r["title"].lower() for r in by_source.get("wordnet", []) if r["id"].startswith("wordnet:verb:")} or None
    split = _chitchat(by_source.get("chitchat", []), limits.get("chitchat", 0), seed, tokenizer, max_tokens)
    for part in split:
        add_retrieved_context(split[part], index, random.Random(f"{seed}:chitchat-context:{part}"), tokenizer,
                              max_tokens)
    # greetings to open a few QA chats with, so a question after small talk still gets read + cited
    openers = {part: [ex["messages"][:2] for ex in exs if ex["meta"].get("opener")] for part, exs in split.items()}
    fillers = [r["id"] for s in QA_BUILDERS for r in by_source.get(s, [])]
    try:
        for source, build in QA_BUILDERS.items():
            quota = limits.get(source, 0)
            if not quota or not by_source.get(source):
                continue
            rng = random.Random(f"{seed}:{source}")
            items = []
            for rec in tqdm(candidates(source, by_source[source], quota, rng), desc=f"sft {source}",
                            unit="rec", disable=not progress, leave=False):
                gold = index.get(f"{rec['id']}#0")
                item = build(rec, clip_text(gold.text, PASSAGE_CHARS), by_source[source], rng) if gold else None
                if item and item["qa"]:
                    item["qa"] += [(q, item["answer"]) for q in varied_questions(item, rng, verbs)]
                    items.append((item, gold))
                else:
                    stats[f"unusable:{source}"] += 1
                if len(items) >= quota:
                    break
            per, extra = divmod(quota, max(1, len(items)))
            before: dict[str, list[dict]] = {"train": [], "test": []}  # the last exchange, for follow-ups
            for n, (item, gold) in enumerate(tqdm(items, desc=f"sft {source} questions", unit="item",
                                                  disable=not progress, leave=False)):
                part = "test" if is_test_entity(item["entity"]) else "train"
                for question, answer in rng.sample(item["qa"], min(len(item["qa"]), per + (n < extra))):
                    history = rng.choice(openers[part]) if openers[part] and rng.random() < FOLLOWUP_SHARE else []
                    if before[part] and item.get("subjects") and rng.random() < TOPIC_FOLLOWUP_SHARE:
                        history = before[part]
                        question = rng.choice(FOLLOWUPS).format(x=rng.choice(item["subjects"]))
                    if rng.random() < CASUAL_SHARE:
                        question = casual(question, rng, protect=item["entity"])
                    if question_key(question) in held_out:
                        stats[f"natural_question:{source}"] += 1
                        continue
                    ex = _qa_example(index, item, gold, history, question, answer, source, fillers, rng,
                                     tokenizer, max_tokens)
                    if ex is None:
                        stats[f"over_budget:{source}"] += 1
                        continue
                    if history is before[part]:
                        ex["meta"]["followup"] = True
                    split[part].append(ex)
                    if ex["meta"]["kind"] == "grounded":
                        before[part] = [dict(m) for m in ex["messages"][-2:]]
    finally:
        index.close()
    for part, examples in split.items():
        random.Random(f"{seed}:shuffle:{part}").shuffle(examples)
    return split["train"], split["test"]


def _chitchat(records: list[dict], quota: int, seed: int, tokenizer, max_tokens: int) -> dict[str, list]:
    split: dict[str, list[dict]] = {"train": [], "test": []}
    rng = random.Random(f"{seed}:chitchat")
    convs = list(records)
    rng.shuffle(convs)
    per, extra = divmod(quota, max(1, len(convs)))
    for n, rec in enumerate(convs[:quota]):
        part = "test" if is_test_entity(rec["id"]) else "train"
        for w, turns in enumerate(chitchat_turns(rec["text"], per + (n < extra), rng)):
            ex = {"messages": turns, "meta": {"kind": "chitchat", "entity": rec["id"], "source": "chitchat",
                                              "gold": None}}
            if w == 0 and max(len(m["content"]) for m in turns[:2]) <= 60:
                ex["meta"]["opener"] = True  # a conversation's first, short exchange: mostly greetings
            while not fit_budget(ex, [], tokenizer, max_tokens) and len(ex["messages"]) > 2:
                ex["messages"] = ex["messages"][2:]
            split[part].append(ex)
    return split


def add_retrieved_context(examples: list[dict], index, rng: random.Random, tokenizer, max_tokens: int,
                          share: float = CHITCHAT_CONTEXT_SHARE) -> int:
    """Give `share` of the chit-chat examples the passages the runtime would retrieve for their last user
    turn (source.prompt.retrieval_query). The reply stays the same and cites nothing: without this the model only ever saw passages
    next to questions and answered "Hi! How are you?" with "I don't know". Returns how many got them."""
    added = 0
    for ex in examples:
        if ex["meta"]["kind"] != "chitchat" or ex.get("context") or rng.random() >= share:
            continue
        from source.prompt import retrieval_query  # source.prompt lays examples out with this module

        upto = max(i for i, m in enumerate(ex["messages"]) if m["role"] == "user")
        trial = dict(ex)
        if fit_budget(trial, index.search(retrieval_query(ex["messages"][:upto + 1]), K), tokenizer, max_tokens) and trial.get("context"):
            ex["context"] = trial["context"]
            added += 1
    return added


def _qa_example(index, item, gold, history, question, answer, source, fillers, rng, tokenizer, max_tokens):
    """One question about `item` after `history`; its passages are what the runtime retrieves for it
    (source.prompt.retrieval_query), with the gold swapped in, or, for a no-answer example, removed."""
    from source.prompt import retrieval_query  # source.prompt lays examples out with this module

    entity = item["entity"]
    meta = {"kind": "grounded", "entity": entity, "source": source, "gold": gold.id,
            "item": gold.id.rsplit("#", 1)[0]}
    msgs = [dict(m) for m in history] + [{"role": "user", "content": question}]
    query = retrieval_query(msgs)
    if rng.random() < NO_ANSWER_SHARE:
        passages = no_answer_context(index, query, gold, entity, fillers, rng)
        ex = {"messages": msgs + [{"role": "assistant", "content": rng.choice(NO_ANSWER_REPLIES)}],
              "context": [], "meta": {**meta, "kind": "no-answer", "gold": None}}
        return ex if fit_budget(ex, passages, tokenizer, max_tokens) else None
    passages, pos = grounded_context(index, query, gold, rng, SHUFFLE_SHARE)
    ex = {"messages": msgs + [{"role": "assistant", "content": cite(answer, pos)}], "context": [], "meta": meta}
    need = _span_end(gold.text, item.get("span", ""))
    return ex if fit_budget(ex, passages, tokenizer, max_tokens, pos, need) else None


def summarize(train: list[dict], test: list[dict]) -> dict:
    """Counts per kind, per source and per (kind, source), for each split."""
    out = {}
    for part, examples in (("train", train), ("test", test)):
        out[part] = {"total": len(examples),
                     "by_kind": dict(sorted(Counter(e["meta"]["kind"] for e in examples).items())),
                     "by_source": dict(sorted(Counter(e["meta"]["source"] for e in examples).items())),
                     "by_kind_source": dict(sorted(Counter(f"{e['meta']['kind']}/{e['meta']['source']}"
                                                           for e in examples).items()))}
    return out


def build_sft_data(data_dir, index_path, out_dir, seed: int = 0, limits: dict | None = None,
                   total: int | None = None, add=(), skip_bad: bool = False, tokenizer=None,
                   max_tokens: int = MAX_TOKENS, helper_examples=(), progress: bool = False) -> dict:
    """The stage: generate, append user (`add` paths) and helper examples to train, write
    OUT/train.jsonl, test.jsonl and stats.json atomically; return the stats."""
    t0 = time.time()
    out = Path(out_dir)
    user: list[dict] = []
    n_bad: dict[str, int] = {}
    for p in add:  # read user files first: a bad line should fail before minutes of generation
        examples, n_bad[str(p)] = load_examples(p, skip_bad)
        user += examples
    skips: Counter = Counter()
    train, test = generate_examples(data_dir, index_path, seed, scaled_limits(limits, total), tokenizer,
                                    max_tokens, progress, skips)
    for ex in helper_examples:  # unchecked by us: never in test, and never about a test entity
        if is_test_entity(ex["meta"].get("entity", "")):
            skips["helper_test_entity"] += 1
        else:
            train.append(ex)
    train += user
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
    stats = {**summarize(train, test), "skipped": dict(sorted(skips.items())), "bad_lines": n_bad,
             "settings": {"data": str(data_dir), "index": str(index_path), "seed": seed,
                          "limits": scaled_limits(limits, total), "max_tokens": max_tokens,
                          "tokenizer": str(tokenizer.path) if tokenizer is not None else None,
                          "passage_chars": PASSAGE_CHARS, "test_fraction": TEST_FRACTION,
                          "shares": {"no_answer": NO_ANSWER_SHARE, "shuffle": SHUFFLE_SHARE,
                                     "followup": FOLLOWUP_SHARE, "topic_followup": TOPIC_FOLLOWUP_SHARE,
                                     "casual": CASUAL_SHARE}, "add": [str(p) for p in add]},
             "seconds": round(time.time() - t0, 1)}
    atomic_write_bytes(out / "stats.json", (json.dumps(stats, indent=2, ensure_ascii=False) + "\n").encode())
    return stats
