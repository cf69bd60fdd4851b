"""Scoring the hand-written natural questions (datasets/eval/natural.jsonl): pure functions, no model.

Design choices:
- The drivers (builder/natural_eval.py) run each item through a shipped path (torch, onnx, the site
  in Chromium) and hand this module what the user would have seen: the reply text, the ids of the
  passages it cites, and every passage shown to the model (id + text as shown, i.e. clipped). So the
  score of a path is computed the same way whatever produced the reply.
- `load_items` checks every line against datasets/eval/README.md and names `file:line` in its
  `ItemError`, so a typo in a hand-written file is found at once, not as a crash mid-run. Extra keys
  are allowed (notes for the authors).
- A record id is a passage id without its `#n` ("docstring:builtins.str.zfill#2" ->
  "docstring:builtins.str.zfill"); gold lists record ids, so any passage of a gold record counts.
- One refusal detector for the project: `source.evaluate.REFUSAL_PATTERN`.

Metrics of one item (`score_item`):
- answerable (gold non-empty): `facts_ok` = every fact is contained in the reply (case-insensitive,
  whitespace runs collapsed; a fact "a | b" is met by either alternative); `cites_gold` = the reply
  cites ([n]) a shown passage whose record id is in gold; `correct` = both. `refused` = the reply
  matches REFUSAL_PATTERN (`refused_answerable` when aggregated). `retrieved` = a gold record was
  among the shown passages (hit@k as this path saw it, k = the passages shown).
- no-answer: `refused` (should be 1); aggregated as `refusal_on_no_answer`, and its complement
  `answered_no_answer`.
- chitchat: `answered` = the reply is non-empty and not a refusal.
- copy fidelity, for any reply: split the reply into sentences (after . ! ? or a newline) and drop
  citation markers ("[1]", "[1, 2]") with the space before them. A sentence *quotes* when it has at
  least 4 words and at least 60% of its distinct content words (`source.evaluate.content_words`: lower
  case, stop words dropped) occur among the content words of one shown passage. It is *verbatim* when
  it occurs in a shown passage's text, both whitespace-normalized, case-sensitive, a trailing period
  optional. A reply quotes when one of its sentences does; it is faithful when every quoting
  sentence is verbatim in some shown passage. `copy_fidelity` = faithful replies / replies that
  quote (None when no reply quotes): how often a reply that leans on a source copies it exactly
  rather than paraphrasing or splicing it.

Aggregates (`aggregate`), per kind and overall, each a share in [0, 1] or None when no item applies:
`correct`, `fact_pass`, `citation_pass`, `refused_answerable`, `retrieval_hit` over answerable items;
`refusal_on_no_answer` and `answered_no_answer` over no-answer items; `chitchat_answered` over
chitchat items; `copy_fidelity` over quoting replies; plus the counts behind them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from source.evaluate import REFUSAL_PATTERN, content_words

KINDS = ("api", "language", "manual", "word", "term", "chitchat", "no-answer")
UNANSWERABLE = ("chitchat", "no-answer")  # gold and facts are [] for these
QUOTE_MIN_WORDS = 4
QUOTE_MIN_OVERLAP = 0.6
METRICS = ("correct", "fact_pass", "citation_pass", "refused_answerable", "retrieval_hit", "refusal_on_no_answer",
           "answered_no_answer", "chitchat_answered", "copy_fidelity")

_ID = re.compile(r"^(?P<kind>[a-z]+(?:-[a-z]+)*)-\d{3,}$")
_CITE_MARK = re.compile(r"\s*\[\d+(?:\s*,\s*\d+)*\]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_SPACE = re.compile(r"\s+")
_PASSAGE_NUMBER = re.compile(r"#\d+$")


class ItemError(ValueError):
    """A malformed line of an evaluation file; the message starts with `file:line:`."""


# ----------------------------------------------------------------------------- loading

def _check(item: object) -> str | None:
    """What is wrong with one parsed line (None when it is a valid item)."""
    if not isinstance(item, dict):
        return "expected a JSON object"
    for key in ("id", "kind", "question", "history", "gold", "facts"):
        if key not in item:
            return f"missing field {key!r}"
    iid, kind = item["id"], item["kind"]
    if kind not in KINDS:
        return f"kind {kind!r} is not one of {', '.join(KINDS)}"
    if not isinstance(iid, str) or not (m := _ID.match(iid)) or m["kind"] != kind:
        return f"id {iid!r} must be '{kind}-NNN'"
    if not isinstance(item["question"], str) or not item["question"].strip():
        return "question must be a non-empty string"
    history = item["history"]
    if not isinstance(history, list):
        return "history must be a list of {role, content} turns"
    for i, turn in enumerate(history):
        want = "user" if i % 2 == 0 else "assistant"
        if not isinstance(turn, dict) or turn.get("role") != want or not isinstance(turn.get("content"), str):
            return f"history[{i}] must be {{\"role\": \"{want}\", \"content\": string}} (user and assistant alternate)"
    if len(history) % 2:
        return "history must end with the assistant's turn (the question is the next user turn)"
    for key in ("gold", "facts"):
        if not isinstance(item[key], list) or not all(isinstance(x, str) and x.strip() for x in item[key]):
            return f"{key} must be a list of non-empty strings"
    if kind in UNANSWERABLE and (item["gold"] or item["facts"]):
        return f"gold and facts must be [] for kind {kind!r}"
    if kind not in UNANSWERABLE and not item["gold"]:
        return f"gold must name at least one record for kind {kind!r}"
    if bad := [g for g in item["gold"] if _PASSAGE_NUMBER.search(g)]:
        return f"gold holds record ids, not passage ids: drop the '#n' of {bad[0]!r}"
    return None


def load_items(path: str | Path) -> list[dict]:
    """Every item of a natural-questions JSONL file (blank lines skipped); ItemError names file:line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ItemError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ItemError(f"{path}: cannot read: {e}") from None
    items, seen = [], {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ItemError(f"{path}:{n}: not valid JSON: {e.msg} (column {e.colno})") from None
        if problem := _check(item):
            raise ItemError(f"{path}:{n}: {problem}")
        if item["id"] in seen:
            raise ItemError(f"{path}:{n}: id {item['id']!r} repeats line {seen[item['id']]}")
        seen[item["id"]] = n
        items.append(item)
    if not items:
        raise ItemError(f"{path}: no items")
    return items


# ----------------------------------------------------------------------------- one item

def record_id(passage_id: str) -> str:
    """"docstring:builtins.str.zfill#2" -> "docstring:builtins.str.zfill"."""
    return _PASSAGE_NUMBER.sub("", passage_id)


def _norm(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


def is_refusal(text: str) -> bool:
    return bool(REFUSAL_PATTERN.search(text))


def fact_present(fact: str, reply: str) -> bool:
    """A fact ("zeros" or "zeros | zeroes") is contained in the reply, case-insensitively."""
    text = _norm(reply).lower()
    return any(_norm(alt).lower() in text for alt in fact.split(" | ") if alt.strip())


def sentences(reply: str) -> list[str]:
    """The reply's sentences with citation markers removed."""
    return [s for s in (_norm(_CITE_MARK.sub("", part)) for part in _SENTENCE_END.split(reply)) if s]


def quote_check(sentence: str, passages: list[str]) -> tuple[bool, bool]:
    """(quotes, verbatim) for one sentence against the shown passage texts (module docstring)."""
    sentence = _norm(sentence)
    if len([w for w in sentence.split() if any(c.isalnum() for c in w)]) < QUOTE_MIN_WORDS:
        return False, False
    words = set(content_words(sentence))
    if not words:
        return False, False
    quotes = any(len(words & set(content_words(p))) / len(words) >= QUOTE_MIN_OVERLAP for p in passages)
    if not quotes:
        return False, False
    core = (sentence[:-1].rstrip() if sentence.endswith(".") else sentence).split(" ")
    texts = [_norm(p) for p in passages]
    for start in range(len(core) // 2 + 1):  # the copied part: from here to the end, at least half
        tail = " ".join(core[start:])
        if len(core) - start >= QUOTE_MIN_WORDS and any(tail in t for t in texts):
            return True, True
    return True, False


def score_item(item: dict, reply: str, cited_ids: list[str], shown: list[dict]) -> dict:
    """Scores of one reply. `cited_ids`: passage ids the reply cites; `shown`: [{"id", "text"}, ...]
    as shown to the model. Keys not applicable to the item's kind are absent."""
    shown_ids = [p["id"] for p in shown]
    texts = [p.get("text", "") for p in shown]
    refused = is_refusal(reply)
    out: dict = {"refused": refused}
    if item["gold"]:
        gold = set(item["gold"])
        missing = [f for f in item["facts"] if not fact_present(f, reply)]
        cites_gold = any(record_id(c) in gold for c in cited_ids if c in shown_ids)
        out.update(facts_ok=not missing, missing_facts=missing, cites_gold=cites_gold,
                   correct=not missing and cites_gold, retrieved=any(record_id(s) in gold for s in shown_ids))
    elif item["kind"] == "chitchat":
        out["answered"] = bool(reply.strip()) and not refused
    checks = [quote_check(s, texts) for s in sentences(reply)]
    quoting = [verbatim for quotes, verbatim in checks if quotes]
    out.update(quote_sentences=len(quoting), verbatim_sentences=sum(quoting))
    out["quotes"] = bool(quoting)
    if quoting:
        out["verbatim"] = all(quoting)
    return out


# ----------------------------------------------------------------------------- aggregates

def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def summarize(scored: list[tuple[dict, dict]]) -> dict:
    """Metrics over (item, score_item result) pairs (module docstring)."""
    answerable = [s for item, s in scored if item["gold"]]
    no_answer = [s for item, s in scored if item["kind"] == "no-answer"]
    chitchat = [s for item, s in scored if item["kind"] == "chitchat"]
    quoting = [s for _, s in scored if s["quotes"]]
    refusal = _share([s["refused"] for s in no_answer])
    return {
        "n": len(scored), "n_answerable": len(answerable), "n_no_answer": len(no_answer),
        "n_chitchat": len(chitchat), "n_quoting": len(quoting),
        "correct": _share([s["correct"] for s in answerable]),
        "fact_pass": _share([s["facts_ok"] for s in answerable]),
        "citation_pass": _share([s["cites_gold"] for s in answerable]),
        "refused_answerable": _share([s["refused"] for s in answerable]),
        "retrieval_hit": _share([s["retrieved"] for s in answerable]),
        "refusal_on_no_answer": refusal,
        "answered_no_answer": None if refusal is None else 1 - refusal,
        "chitchat_answered": _share([s["answered"] for s in chitchat]),
        "copy_fidelity": _share([s["verbatim"] for s in quoting]),
    }


def aggregate(scored: list[tuple[dict, dict]]) -> dict:
    """{"overall": summarize(all), "by_kind": {kind: summarize(items of that kind)}} (kinds in KINDS order)."""
    kinds = [k for k in KINDS if any(item["kind"] == k for item, _ in scored)]
    return {"overall": summarize(scored),
            "by_kind": {k: summarize([(i, s) for i, s in scored if i["kind"] == k]) for k in kinds}}


def agreement(replies: dict[str, dict[str, str]]) -> dict[str, dict]:
    """For each pair of paths ({path: {item id: reply text}}): the share of their common items with
    the identical reply text, and the ids where they differ (in the first path's order)."""
    names = list(replies)
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = [k for k in replies[a] if k in replies[b]]
            differ = [k for k in common if replies[a][k] != replies[b][k]]
            out[f"{a}-{b}"] = {"n": len(common), "same": len(common) - len(differ),
                               "share": (len(common) - len(differ)) / len(common) if common else None,
                               "differ": differ}
    return out
