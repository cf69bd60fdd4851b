"""WordNet 3.0 from Debian's wordnet-base: one record per synset from `data.{noun,verb,adj,adv}`.

Design choices:
- Parse the data files directly (the format is documented in wndb(5)): no nltk, no downloads.
- One record per synset, not per lemma: synonyms share a definition, and repeating it per lemma
  would only be deduplicated away later. The first lemma is the title; the others are listed.
- Text reads as a dictionary line a small model can learn to answer "What does X mean?" from:
  'ephemeral (adjective): lasting a very short time. Also: short-lived, transient. Example: "...".'
- Adjective syntactic markers such as "(a)" or "(p)" are stripped from lemmas.
- Ids are "wordnet:<pos>:<8-digit offset>", WordNet's own stable synset key.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from source.corpus import dpkg_version

DEFAULT_PATH = "/usr/share/wordnet"
INSTALL_HINT = "apt-get install wordnet-base"
POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
MARKER = re.compile(r"\((a|p|ip)\)$")


def missing(path: str | None) -> str | None:
    root = Path(path or DEFAULT_PATH)
    if not root.is_dir():
        return f"{root} not found"
    absent = [f"data.{p}" for p in POS if not (root / f"data.{p}").is_file()]
    return f"{', '.join(absent)} missing in {root}" if absent else None


def input_files(path: str | None) -> list[Path]:
    return [Path(path or DEFAULT_PATH) / f"data.{p}" for p in POS]


def version() -> str | None:
    return dpkg_version("wordnet-base")


def parse_line(line: str) -> tuple[str, list[str], str, list[str]]:
    """'offset lex_filenum ss_type w_cnt word lex_id ... | gloss' -> (offset, words, definition, examples)."""
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    n_words = int(fields[3], 16)
    words = [MARKER.sub("", fields[4 + 2 * i]).replace("_", " ") for i in range(n_words)]
    # The gloss is 'definition; definition; "example"; "example"': quoted parts are examples.
    examples = [e.strip() for e in re.findall(r'"([^"]+)"', gloss) if e.strip()]
    rest = re.sub(r'"[^"]*"', "", gloss)
    definition = "; ".join(p.strip() for p in rest.split(";") if p.strip())
    return fields[0], words, definition, examples


def synset_text(words: list[str], pos: str, definition: str, examples: list[str]) -> str:
    text = f"{words[0]} ({POS[pos]}): {definition.rstrip('.')}."
    others = [w for w in dict.fromkeys(words[1:]) if w != words[0]]
    if others:
        text += f" Also: {', '.join(others)}."
    if examples:
        label = "Example" if len(examples) == 1 else "Examples"
        text += f" {label}: " + "; ".join(f'"{e}"' for e in examples) + "."
    return text


def records(path: str | None = None, limit: int | None = None) -> Iterator[dict]:
    for f, pos in zip(input_files(path), POS):
        with open(f, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("  "):
                    continue  # the licence header lines start with two spaces
                offset, words, definition, examples = parse_line(line)
                if not definition:
                    continue
                yield {"id": f"wordnet:{pos}:{offset}", "title": words[0],
                       "text": synset_text(words, pos, definition, examples), "origin": str(f)}
