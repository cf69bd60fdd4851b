"""How people type their questions: the varied forms the SFT generator asks in.

v9 was trained on a handful of templates per source ("What does X do?", "Define X.") and refused two
thirds of the hand-written natural questions, even when retrieval had put the answer first: it had
learnt to answer the template shapes, not to read. This module widens the question side, by general
rules over the gold passage rather than word lists for particular questions:
- `howto_questions`: a docstring's lead says what the API does ("Pad a numeric string with zeros on
  the left"), so a task question can be derived from it without the API's name ("how do i pad a
  numeric string with zeros"), the way people ask when they do not know the name yet;
- `request_questions`: "explain X to me", "what's X for", "X?" ... per kind of record;
- `casual`: lower case, no question mark, a typo in an ordinary word, filler ("quick question:").
The answers stay the quoted ones of source.sft_templates: only the asking varies.
"""

from __future__ import annotations

import random
import re

FILLERS = ("quick question: ", "hey, ", "hi, ", "so ", "ok so ", "question: ", "hello, ", "um ", "hey ",
           "can you help? ", "sorry, ")
SUFFIXES = (" pls", " please", " thanks", "??", " ?", "...", " thx")
HOWTO_FORMS = ("how do i {v}", "how to {v}", "how can i {v}?", "is there a way to {v}?", "{v}",
               "python: {v}", "what's the function to {v}?", "best way to {v}?", "i want to {v}",
               "i need to {v}, how?", "which function can {v}?", "{v} in python")
REQUESTS = {
    "api": ("explain {x} to me", "what's {x} for", "what is {x} for?", "tell me about {x}", "{x}?", "{x}",
            "how does {x} work?", "can you explain {x}?", "what does {x} actually do", "help with {x}",
            "i don't get {x}", "{x} - what does it do?", "whats {x}", "info on {x}", "{x} explained"),
    "topic": ("explain {x} to me", "how does {x} work", "how do {x} work in python?", "tell me about {x}",
              "{x}?", "what are {x}", "what's {x} in python", "i don't understand {x}", "{x} explained",
              "help me understand {x}", "can you explain {x} please", "whats {x} about"),
    "word": ("what's {x} mean", "{x} meaning", "{x}?", "{x} definition", "meaning of {x}", "whats {x}",
             "what does {x} mean in english", "define: {x}", "{x} means what?", "what is the meaning of {x}",
             "i keep seeing the word {x}, what does it mean?", "what does the word {x} mean",
             "definition of {x} pls", "{x} - meaning?", "what do people mean by {x}"),
    "term": ("what's {x}", "{x} in computing?", "what is {x} in computer science", "explain {x} to me",
             "what does {x} mean", "{x}?", "eli5 {x}", "tell me about {x}", "what exactly is {x}?",
             "{x} meaning in tech", "can you explain what {x} is", "whats {x} in programming"),
}
_VERB_END = {"ies": "y", "sses": "ss", "shes": "sh", "ches": "ch", "xes": "x", "zes": "z"}
_CLAUSE_CUT = re.compile(r"\s*(?:[;:(]|,\s|\s-\s|\s(?:if|unless|where|using|as|when|and return|and raise)\s)")
_NOT_VERB = {"a", "an", "the", "this", "that", "these", "it", "if", "for", "when", "new", "internal",
             "deprecated", "alias", "same", "like", "base", "abstract", "helper", "convenience", "utility",
             "default", "class", "function", "method", "module", "simple", "private", "common", "generic"}


def _markup_free(text: str) -> str:
    return " ".join(re.sub(r"``?|\*\*?|:\w+:", "", text).split())


def _imperative(word: str) -> str:
    """'Returns' -> 'return', 'Matches' -> 'match'; an imperative stays as it is."""
    w = word.lower()
    for end, repl in _VERB_END.items():
        if w.endswith(end):
            return w[: -len(end)] + repl
    return w[:-1] if w.endswith("s") and not w.endswith(("ss", "us", "is")) else w


def howto_task(lead: str, verbs: set[str] | None = None, max_words: int = 12) -> str | None:
    """The task an API's lead sentence describes, as a user would type it, or None when the lead is no
    imperative. 'Return a random element from the non-empty sequence seq.' -> 'get a random element from
    the non-empty sequence seq'; 'Return True if the string is empty' -> 'check if the string is empty'.
    `verbs` (WordNet's verb lemmas, when the corpus has them) tells "Handle a request" from "Handler for
    call events" and "Standard deviation of ..."; without it any capitalised first word is taken."""
    text = _markup_free(re.split(r"(?<=[.!?])\s", lead.strip())[0]).rstrip(".")
    words = text.split()
    if len(words) < 3 or not re.fullmatch(r"[A-Z][a-z]+", words[0]) or words[0].lower() in _NOT_VERB \
            or words[1].lower() in ("for", "of", "to", "that", "which", "with", "is", "are"):
        return None
    verb, rest = _imperative(words[0]), " ".join(words[1:])
    if verbs is not None and verb not in verbs:
        return None
    if verb == "return":
        m = re.match(r"(?:True|true|whether)\s+(?:if\s+|iff\s+)?(.*)", rest)
        if m:
            condition = re.split(r",?\s+(?:else|otherwise|and\s+False|or\s+False)\b", m.group(1))[0]
            verb, rest = "check", ("whether " if rest.startswith("whether") else "if ") + condition
        else:
            verb = "get"
    if not rest.startswith(("if ", "whether ")):
        cut = _CLAUSE_CUT.search(rest)
        rest = rest[:cut.start()] if cut else rest
    task = f"{verb} {rest}".strip()
    balanced = all(task.count(a) == task.count(b) for a, b in ("()", "[]", "{}")) and task.count("'") % 2 == 0 \
        and task.count('"') % 2 == 0
    if not balanced or not 2 <= len(task.split()) <= max_words or not re.search(r"[a-z]{3}", rest):
        return None
    return task


def howto_questions(lead: str, rng: random.Random, verbs: set[str] | None = None, n: int = 3) -> list[str]:
    task = howto_task(lead, verbs)
    if not task:
        return []
    return [form.format(v=task) for form in rng.sample(HOWTO_FORMS, min(n, len(HOWTO_FORMS)))]


def request_questions(kind: str, subject: str, rng: random.Random, n: int = 4) -> list[str]:
    forms = REQUESTS[kind]
    return [form.format(x=subject) for form in rng.sample(forms, min(n, len(forms)))]


FOLLOWUPS = ("what about {x}?", "and {x}?", "ok and {x}", "how about {x}", "what about {x} then",
             "and what is {x}?", "same question for {x}", "now {x}?")


def varied_questions(item: dict, rng: random.Random, verbs: set[str] | None = None) -> list[str]:
    """Questions beyond the templates for an item of source.sft_templates: requests about each name
    people use for it (`item["subjects"]`, asked as `item["ask"]`: api/topic/word/term) and, for an
    API, how-to questions from its lead (`item["span"]`) that do not name it."""
    out = []
    for subject in item.get("subjects", []):
        out += request_questions(item["ask"], subject, rng, n=3)
    if item.get("howto"):
        out += howto_questions(item["span"], rng, verbs, n=4)
    return out


def typo(word: str, rng: random.Random) -> str:
    """One slip of the fingers inside `word`: a swapped, dropped or doubled letter."""
    i = rng.randrange(1, len(word) - 1)
    slip = rng.choice(("swap", "drop", "double"))
    if slip == "swap":
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if slip == "drop":
        return word[:i] + word[i + 1:]
    return word[:i] + word[i] + word[i:]


def casual(question: str, rng: random.Random, protect: str = "") -> str:
    """`question` typed in a hurry: often lower case and without its question mark, sometimes with a
    filler, a trailing word or a typo in an ordinary word (never inside `protect`, the thing asked about:
    retrieval would then rightly miss it)."""
    q = question
    if rng.random() < 0.6:
        q = q.lower()
    if rng.random() < 0.5:
        q = q.rstrip("?.! ")
    if rng.random() < 0.2:
        protected = set(protect.lower().split())
        spots = [i for i, w in enumerate(q.split()) if len(w) >= 5 and w.isalpha() and w.lower() not in protected]
        if spots:
            words = q.split()
            i = rng.choice(spots)
            words[i] = typo(words[i], rng)
            q = " ".join(words)
    if rng.random() < 0.15:
        q = rng.choice(FILLERS) + (q[0].lower() + q[1:] if rng.random() < 0.5 else q)
    if rng.random() < 0.08:
        q = q.rstrip("?") + rng.choice(SUFFIXES)
    return q
