"""Question and answer templates for the offline SFT generator, one builder per corpus source.

A builder takes a record and the text of its gold passage (chunk 0, clipped as the model will see
it) and returns {"entity", "qa": [(question, answer), ...], "span", "answer", "ask", "subjects"}, or
None when the passage has nothing short and quotable; source.sft_phrasing asks the same answer in
the other ways people ask (`ask` is the kind of record, `subjects` the names people use for it).
Answers are built only from `span`, a verbatim piece of the passage, so the model learns to copy from
its sources; `cite` adds the marker later, once the gold's position in the context is known. Also here: which records to sample (`candidates`), how a QA
example's passages are picked (`grounded_context`, `no_answer_context`) and chit-chat windows.
Kept apart from sft_data.py so that file reads as the pipeline.
"""

from __future__ import annotations

import random
import re
from collections import Counter

K = 3  # passages per question, as the runtime retrieves
MAX_WORDS = 45  # the quoted part; with the rephrasing an answer stays under ~60 words
_ABBR = re.compile(r"\b(?:e\.g|i\.e|etc|vs|cf|approx|esp|incl|Mr|Mrs|Dr|St|Jr|Inc|Ltd|No|Fig|al|resp)\.")
_END = re.compile(r"[.!?][\"')]?$")
# a sentence that only announced a list or code block ("... as follows:", "This includes utilities for:")
_DANGLING = re.compile(r"\b(follows|following|below|example|examples|this|these|such|for|of|to|with|in|on|by|as|"
                       r"like|from|include|includes|including|is|are|the|a|an|and|or)\.$", re.I)


# ----------------------------------------------------------------------------- text helpers

def sentences(text: str) -> list[str]:
    t = _ABBR.sub(lambda m: m.group().replace(".", "\0"), " ".join(text.split()))
    return [s.replace("\0", ".") for s in re.split(r"(?<=[.!?])\s+(?=[\"'(`*A-Z0-9])", t) if s]


def lead(text: str, max_words: int = MAX_WORDS, max_sents: int = 2) -> str | None:
    """The first one or two whole sentences of `text` (at most `max_words`), or None."""
    out: list[str] = []
    text = re.sub(r"^[*-] ", "", text.strip())  # a bullet list's first item
    if text.endswith(":"):  # "The for statement is used to iterate over ...:" before a grammar block
        text = text[:-1] + "."
    for s in sentences(text)[:max_sents]:
        if not _END.search(s) or s.endswith("...") or len(" ".join(out + [s]).split()) > max_words \
                or _DANGLING.search(s) or (out and s.startswith(("(", "See ", "Compare "))):
            break
        out.append(s)
    if not out or len(out[0].split()) < 3 or out[0].startswith(("See ", "Compare ")):
        return None
    return " ".join(out)


def paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def is_prose(p: str) -> bool:
    return (not p[:1].isspace() and "::=" not in p and ">>>" not in p and len(p.split()) >= 4
            and re.match(r"[\"'`*(\w]", p) is not None and not re.match(r"[\w.]+\(.*\)\s*(->.*)?$", p.split("\n")[0]))


def first_prose(text: str) -> str | None:
    return next((p for p in paragraphs(text) if is_prose(p)), None)


def cite(answer: str, n: int) -> str:
    """'X is y.' -> 'X is y [n].' (the marker goes before the final punctuation)."""
    a = answer.rstrip()
    if re.search(r"\b(etc|e\.g|i\.e|al|[A-Z])\.$", a):  # the dot belongs to an abbreviation
        return f"{a} [{n}]"
    return f"{a[:-1]} [{n}]{a[-1]}" if a[-1:] in ".!?" else f"{a} [{n}]."


def phrase(title: str) -> str:
    """A heading as it reads inside a sentence: 'The "try" statement' -> 'the try statement'."""
    title = title.split(" — ")[0].replace('"', "").strip()
    return " ".join(w if any(c.isupper() for c in w[1:]) or w in ("Python", "I") else w.lower()
                    for w in title.split())


_LOWERABLE = set("A An The One Any To Used Said Part Someone Something Software Common Synonym Term "
                 "Variant Slang Another Early Short Abbreviation Jargon Obsolete Alternative Name Similar Same Like".split())
_SENTENCE_START = set("In When If On For There It It's What Do Not Yet Using Given Under This These "
                      "Most Many Some Each Every".split())


def _title_counts(records: list) -> Counter:
    """Title -> how many records have it, for one source's list (cached: one source at a time)."""
    return _record_counts(records)[0]


def _last_part_counts(records: list) -> Counter:
    """Last dotted part of a title ('zfill' of 'builtins.str.zfill') -> how many records end with it."""
    return _record_counts(records)[1]


def _record_counts(records: list) -> tuple[Counter, Counter]:
    if _COUNTS[0] is not records:
        _COUNTS[:] = [records, (Counter(r["title"] for r in records),
                                Counter(r["title"].rsplit(".", 1)[-1] for r in records))]
    return _COUNTS[1]


_COUNTS: list = [None, (Counter(), Counter())]


def _is_sentence(s: str) -> bool:
    """Does `s` have its own verb ("A closure is ...") or is it a noun phrase ("An optimisation where
    a function is ...")? The verb must come before any relative word or preposition."""
    words = [w.lower().strip(",;:()\"") for w in s.split()[:12]]
    verb = next((i for i, w in enumerate(words) if w in _VERBS_BE), None)
    rel = next((i for i, w in enumerate(words) if w in _RELATIVE), len(words))
    return verb is not None and verb < rel


_VERBS_BE = {"is", "are", "was", "were", "means", "refers", "has", "have", "can", "may", "describes"}
_RELATIVE = {"where", "which", "that", "who", "whose", "for", "of", "with", "used", "in", "on", "to", "by",
             "from", "consisting", "containing", "based", "designed", "developed", "written", "produced"}


# ----------------------------------------------------------------------------- builders

def qa_docstring(rec: dict, text: str, records: list, rng: random.Random) -> dict | None:
    """Every answer quotes the docstring's lead as it stands ("json.dumps: Serialize ``obj`` to a JSON
    formatted ``str`` [1]."), ``literals`` included: they read as code in Markdown. Rephrasing it into
    "json.dumps serializes obj to ..." (the generator did until v6) asked an 8M-parameter model to
    lowercase, conjugate and drop markup while copying; v5 and v6 garbled those answers and not the
    FOLDOC and WordNet ones, which are quoted."""
    name, module = rec["title"], rec["origin"]
    head, _, body = text.partition("\n\n")
    para = body.split("\n\n")[0] if body else ""
    span = lead(para) if para and is_prose(para) else None
    if not span:
        return None
    if head.startswith("Module "):
        desc = span if re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", span) else f"The {name} module: {span}"
        return {"entity": name, "span": span, "answer": desc, "ask": "api", "subjects": [name],
                "qa": [(q, desc) for q in (
            f"What is the {name} module?", f"What does the {name} module do?", f"What is {name} used for in Python?",
            f"Tell me about the {name} module.", f"{name} module?", f"Explain the {name} module.")]}
    desc = f"{name}: {span}"
    sig = re.sub(r"\(self(, )?", "(", head.removeprefix("class ").strip())
    usage_sig = f"{sig}." if len(sig) <= 90 and sig.startswith(name) else None
    if head.startswith("class "):
        usage = f"Create one with {usage_sig} {desc}" if usage_sig else desc
        return {"entity": name, "span": span, "answer": desc, "ask": "api", "subjects": api_names(name, records),
                "howto": True, "qa": [
            (f"What is {name}?", desc), (f"What is the {name} class?", desc), (f"What is {name} used for?", desc),
            (f"Explain the {name} class.", desc), (f"{name}?", desc), (f"How do I create a {name}?", usage)]}
    usage = f"Call {usage_sig} {desc}" if usage_sig else desc
    qa = [(f"What does {name} do?", desc), (f"What is {name} used for?", desc), (f"Explain {name}.", desc),
          (f"How do I use {name}?", usage), (f"{name}?", desc), (f"what does {name} do", desc),
          (f"Tell me about {name}.", desc)]
    short = name[len(module) + 1:] if name.startswith(module + ".") else ""
    if short and "." not in short:
        qa.append((f"What does {short}() in the {module} module do?", desc))
    return {"entity": name, "span": span, "qa": qa, "answer": desc, "ask": "api", "subjects": api_names(name, records),
            "howto": True}


def api_names(name: str, records: list) -> list[str]:
    """The names people type for an API: 'builtins.str.zfill' -> ['str.zfill', 'zfill']; the bare last
    part only when no other record of the source ends with it (a question about "close" has many answers)."""
    parts = name.removeprefix("builtins.").split(".")
    out = [".".join(parts)]
    if len(parts) > 2:
        out.append(".".join(parts[-2:]))
    if len(parts) > 1 and len(parts[-1]) >= 4 and _last_part_counts(records)[parts[-1]] == 1:
        out.append(parts[-1])
    return out



def qa_pydoc_topic(rec: dict, text: str, records: list, rng: random.Random) -> dict | None:
    lines = text.split("\n")
    header = lines[0].strip()
    body = "\n".join(lines[2:] if len(lines) > 1 and set(lines[1].strip()) <= set("*=-") else lines[1:])
    para = first_prose(body)
    span = lead(para) if para else None
    if not span or not header:
        return None
    name = phrase(header)
    plural = name.split()[-1].endswith("s") and not name.endswith("ss")
    be, do = ("are", "do") if plural else ("is", "does")
    qa = [(f"How {do} {name} work in Python?", span), (f"Tell me about {name} in Python.", span),
          (f"Explain {name}.", span), (f"What {be} {name} in Python?", span),
          (f"What does the Python documentation say about {name}?", span), (f"{name}?", span),
          (f"Can you explain {name} in Python?", span)]
    if kw := re.fullmatch(r'The "(\w+)" statement', header):
        k = kw.group(1)
        qa += [(f"How do I use the {k} statement?", span), (f"What does the {k} statement do?", span),
               (f"How does {k} work in Python?", span), (f"What is '{k}' in Python?", span),
               (f"{k} statement?", span)]
    subjects = [name] + ([f"the {kw.group(1)} statement"] if kw else [])
    return {"entity": rec["title"], "span": span, "qa": qa, "answer": span, "ask": "topic", "subjects": subjects}




def qa_python_docs(rec: dict, text: str, records: list, rng: random.Random) -> dict | None:
    title = rec["title"]
    first, _, body = text.partition("\n")
    m = re.fullmatch(re.escape(title) + r" \((.*)\)", first.strip())
    page = m.group(1) if m else ""
    para = first_prose(body)
    span = lead(para) if para else None
    if not span or title in ("Acknowledgements", "Footnotes", "Changelog") or "Changelog" in page:
        return None
    counts = _title_counts(records)
    t, mod = phrase(title), page.split(" — ")[0] if " — " in page else ""
    entity = f"{title} ({page})" if page else title
    if title.endswith("?"):
        qa = [(title, span), (f"In Python, {title[0].lower()}{title[1:]}", span)]
    elif page.startswith("What's New"):
        ver = page.removeprefix("What's New In ").removeprefix("What's New in ")
        qa = [(f"What's new in {ver} about {t}?", span), (f"What changed in {ver}: {t}?", span)]
    elif not page and " — " in title:
        entity = mod = title.split(" — ")[0].strip()
        qa = [(f"What is the {mod} module?", span), (f"What does the {mod} module do?", span),
              (f"Tell me about the {mod} module.", span), (f"What is {mod} used for in Python?", span)]
    elif counts[title] > 1 and page:
        where = mod or page
        qa = [(f"Tell me about {t} in {where}.", span), (f"What does the {where} documentation say about {t}?", span),
              (f"{title} ({where})?", span)]
    else:
        qa = [(f"Tell me about {t}.", span), (f"What does the Python documentation say about {t}?", span),
              (f"Explain {t}.", span), (f"{title}?", span)]
        if mod:
            qa.append((f"Tell me about {t} in {mod}.", span))
    subjects = [t] if not page.startswith("What's New") and not title.endswith("?") else []
    return {"entity": entity, "span": span, "qa": qa, "answer": span, "ask": "topic", "subjects": subjects}


def qa_wordnet(rec: dict, text: str, records: list, rng: random.Random) -> dict | None:
    m = re.match(r"(.+?) \((noun|verb|adjective|adverb)\): ", text)
    if not m or text.endswith("..."):
        return None
    w, pos, rest = m.group(1), m.group(2), text[m.end():]
    cuts = [i for i in (rest.find(". Also: "), rest.find(". Example: "), rest.find(". Examples: ")) if i >= 0]
    d = rest[:min(cuts)] if cuts else rest.rstrip().rstrip(".")
    if not d or len(d.split()) > 40:
        return None
    also = re.search(r"\. Also: ([^\"]*?)\.(?: Examples?:|$)", rest)
    examples = re.findall(r'"([^"]+)"', rest[min(cuts):]) if cuts else []
    span = f"{w} ({pos}): {d}."

    def answer() -> str:
        r = rng.random()
        if examples and r < 0.3 and len(f"{d} {examples[0]}".split()) <= 50:
            return f"'{w}' means {d}, as in \"{examples[0]}\"."
        if also and r < 0.45 and len(f"{d} {also.group(1)}".split()) <= 50:
            return f"'{w}' means {d}. Similar words: {also.group(1)}."
        return f"{w} ({pos}): {d}." if r < 0.6 else f"'{w}' means {d}."

    qs = [f"What does '{w}' mean?", f"What does {w} mean?", f"Define {w}.", f"Meaning of {w}?",
          f"What is the meaning of the word '{w}'?", f"define {w}", f"{w} meaning", f"What's the definition of {w}?"]
    if pos == "noun" and w.islower():
        qs.append(f"What is {'an' if w[0] in 'aeiou' else 'a'} {w}?")
    elif pos == "verb":
        qs.append(f"What does it mean to {w}?")
    elif pos == "adjective":
        qs.append(f"What does it mean if something is {w}?")
    return {"entity": w, "span": span, "qa": [(q, answer()) for q in qs], "answer": answer(), "ask": "word",
            "subjects": [w]}


def qa_foldoc(rec: dict, text: str, records: list, rng: random.Random) -> dict | None:
    title = rec["title"]
    _, _, body = text.partition("\n\n")
    para = re.sub(r"^\d+\.\s*", "", paragraphs(body)[0].strip()) if body.strip() else ""
    tags = re.match(r"(?:<[^>]*>\s*|\[[^\]]{1,30}\]\s*)+", para)  # <networking, protocol> [IBM]
    domain = tags.group() if tags else ""
    para = re.sub(r"^\d+\.\s*", "", para[len(domain):])
    paren = re.match(r"\(([^()]{1,120})\)\s*", para)
    para = para[paren.end():] if paren else para
    para = re.sub(r"^/[^/\n]{1,40}/\s*", "", para)  # /hi:'per-spays/ pronunciation
    span = lead(para)
    if not span or span.startswith(("See ", "Compare ")) or len(span.split()) < 4:
        return None
    first = sentences(span)[0]
    word = first.split()[0]

    def define(name: str, s: str) -> str:  # "A suspension is ..." stays; "A format ..." -> "X is a format ..."
        if _is_sentence(first) or word in _SENTENCE_START:
            return s
        return f"{name} is {s[0].lower()}{s[1:]}" if word in _LOWERABLE else f"{name}: {s}"
    desc = define(title, span)
    qa = [(f"What is {title}?", desc), (f"What is {title} in computing?", desc), (f"Explain {title}.", desc),
          (f"Define {title}.", desc), (f"What does {title} mean in computing?", desc), (f"{title}?", desc)]
    if re.fullmatch(r"[a-z][a-z -]+", title) and "programming" in domain:
        qa.append((f"What is {'an' if title[0] in 'aeiou' else 'a'} {title} in programming?", desc))
    it = define("It", first)
    it = it if it.startswith("It is ") or _is_sentence(first) or word in _SENTENCE_START else f"It is: {first}"
    p = paren.group(1) if paren else ""
    if p and " " in title and re.fullmatch(r"[A-Z][A-Z0-9/&.+-]{1,11}", p) and not _title_counts(records)[p]:
        qa += [(f"What does {p} stand for?", f"{p} stands for {title}. {it}"),  # (TCP) after "Transmission ..."
               (f"What is {p}?", define(f"{title} ({p})", span))]
    elif p and " " in p and re.fullmatch(r"[A-Z0-9][A-Za-z0-9/&.+-]{1,11}", title) and title.upper() == title:
        qa.append((f"What does {title} stand for?", f"{title} stands for {p}. {it}"))
    return {"entity": title, "span": span, "qa": qa, "answer": desc, "ask": "term", "subjects": [title]}


def candidates(source: str, records: list[dict], quota: int, rng: random.Random) -> list[dict]:
    """Records worth turning into items, shuffled. WordNet: unique headwords only (a question about
    "bank" has many right answers), three quarters plain lowercase words, sampled down."""
    records = list(records)
    rng.shuffle(records)
    if source != "wordnet":
        return records
    n_title = Counter(r["title"].lower() for r in records)
    unique = [r for r in records if n_title[r["title"].lower()] == 1]
    common = [r for r in unique if re.fullmatch(r"[a-z]{3,}", r["title"])]
    other = [r for r in unique if not re.fullmatch(r"[a-z]{3,}", r["title"])]
    picked = common[:int(1.5 * quota * 0.75)] + other[:int(1.5 * quota * 0.25)]
    rng.shuffle(picked)
    return picked


QA_BUILDERS = {"pydoc-topics": qa_pydoc_topic, "docstrings": qa_docstring, "python-docs": qa_python_docs,
               "wordnet": qa_wordnet, "foldoc": qa_foldoc}


# ----------------------------------------------------------------------------- contexts

def grounded_context(index, question: str, gold, rng: random.Random, shuffle: float = 0.0) -> tuple[list, int]:
    """Top-K hits for `question` with the gold passage in them -> (passages, 1-based gold position)."""
    record = gold.id.rsplit("#", 1)[0]
    hits = index.search(question, K)
    where = [i for i, p in enumerate(hits) if p.id.rsplit("#", 1)[0] == record]
    if where:
        hits[where[0]] = gold
    else:
        hits = hits[:K - 1]
        hits.insert(rng.randrange(len(hits) + 1), gold)
    if len(hits) > 1 and rng.random() < shuffle:
        rng.shuffle(hits)
    return hits, next(i for i, p in enumerate(hits) if p.id == gold.id) + 1


def no_answer_context(index, question: str, gold, entity: str, fillers: list[str], rng: random.Random) -> list:
    """Hits for `question` minus anything about `entity`, padded with random passages to K."""
    record = gold.id.rsplit("#", 1)[0]
    names = re.compile(rf"(?<!\w){re.escape(entity)}(?!\w)", re.I) if len(entity) >= 3 else None

    short = entity.rsplit(".", 1)[-1].lower()
    gold_words = " ".join(gold.text.split()[:8]).lower() if len(gold.text.split()) >= 8 else None

    def about(p) -> bool:  # its record, its name (also as another class's method), or the same text
        title = p.title.strip().lower()
        return (p.id.rsplit("#", 1)[0] == record or title == entity.strip().lower()
                or ("." in entity and title.rsplit(".", 1)[-1] == short)
                or bool(gold_words and gold_words in " ".join(p.text.split()).lower())
                or bool(names and (names.search(p.text) or names.search(p.title))))

    out = [p for p in index.search(question, K + 7) if not about(p)][:K]
    for _ in range(50):
        if len(out) >= K or not fillers:
            break
        p = index.get(f"{rng.choice(fillers)}#0")
        if p is not None and not about(p) and p.id not in {q.id for q in out}:
            out.append(p)
    return out


# ----------------------------------------------------------------------------- chit-chat

def _clean_turn(t: str) -> str:
    t = " ".join(t.split())
    t = re.sub(r"([!?.])\1{2,}", r"\1", t)  # "!!!!" -> "!"
    return t[:1].upper() + t[1:] if re.search(r"\w", t) else ""


def chitchat_turns(text: str, n: int, rng: random.Random, max_chars: int = 300) -> list[list[dict]]:
    """Up to `n` non-overlapping windows of 2-6 turns ("A: ...\\nB: ..."), user first, assistant last."""
    turns: list[tuple[str, str]] = []
    for line in text.split("\n"):
        m = re.match(r"([A-Z]): (.*)", line)
        if m:
            turns.append((m.group(1), _clean_turn(m.group(2))))
    windows, i = [], 0
    while i < len(turns) - 1 and len(windows) < n:
        size = rng.choice((2, 4, 4, 6))
        w = turns[i:i + size]
        w = w[:len(w) - len(w) % 2]
        i += size
        if len(w) < 2 or any(not t or len(t) > max_chars for _, t in w) \
                or any(a[0] == b[0] for a, b in zip(w, w[1:])):
            continue
        windows.append([{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, (_, t) in enumerate(w)])
    return windows
