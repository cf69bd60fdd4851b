"""Chit-chat conversations from the `chitchat_dataset` PyPI package (MIT): casual two-person talk.

Design choices:
- Read the package's dataset.json directly (its Python classes load it the same way).
- One record per conversation, turns written "A: ...\\nB: ...", speakers lettered in order of first
  appearance; a turn is the sender's consecutive bubbles joined with spaces (the package's own
  end-of-utterance convention).
- Filter junk line by line, then conversation by conversation: drop bubbles with URLs, offensive
  words, shouting (all caps) or long punctuation runs; drop conversations left with fewer than
  MIN_TURNS turns or MIN_CHARS characters (about 45% of the 7,168 are one message long).
- The conversation's prompt, when present, is its title (handy for retrieval and inspection).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path

DEFAULT_PATH = None  # dataset.json inside the installed chitchat_dataset package
INSTALL_HINT = "pip install chitchat-dataset"
MIN_TURNS = 4
MIN_CHARS = 200

URL = re.compile(r"https?://|\bwww\.|\b[\w-]+\.(com|net|org|io|ly)\b", re.I)
# Deliberately short: strong profanity and slurs. Mild words ("damn") are ordinary chat.
OFFENSIVE = re.compile(r"\b(fuck\w*|shit\w*|bitch\w*|cunt\w*|asshole\w*|dick(head)?s?|pussy|cock\w*|"
                       r"whores?|sluts?|fag\w*|nigg\w*|retard\w*|rape\w*|porn\w*|nazi\w*)\b", re.I)


def _default_file() -> Path | None:
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent / "dataset.json"


def _file(path: str | None) -> Path | None:
    if path:
        p = Path(path)
        return p / "dataset.json" if p.is_dir() else p
    return _default_file()


def missing(path: str | None) -> str | None:
    f = _file(path)
    if f is None:
        return "the chitchat_dataset package is not installed"
    return None if f.is_file() else f"{f} not found"


def input_files(path: str | None) -> list[Path]:
    f = _file(path)
    return [f] if f else []


def version() -> str | None:
    try:
        return importlib.metadata.version("chitchat-dataset")
    except importlib.metadata.PackageNotFoundError:
        return None


def junk(line: str) -> bool:
    letters = [c for c in line if c.isalpha()]
    if not any(c.isalnum() for c in line):
        return len(line) > 3  # "?" and ":)" are replies; "!!!!!!!" is noise
    shouting = len(letters) >= 8 and all(c.isupper() for c in letters)
    return shouting or bool(URL.search(line)) or bool(OFFENSIVE.search(line))


def conversation_text(messages: list[list[dict]]) -> str:
    speakers: dict[str, str] = {}
    turns: list[tuple[str, str]] = []
    for message in messages:
        bubbles = [" ".join(u.get("text", "").split()) for u in message]
        bubbles = [b for b in bubbles if b and not junk(b)]
        if not bubbles or not message:
            continue
        who = speakers.setdefault(message[0].get("sender", ""), "AB"[len(speakers) % 2])
        if turns and turns[-1][0] == who:  # a dropped reply can leave two turns by one speaker
            turns[-1] = (who, turns[-1][1] + " " + " ".join(bubbles))
        else:
            turns.append((who, " ".join(bubbles)))
    if len(turns) < MIN_TURNS:
        return ""
    text = "\n".join(f"{who}: {said}" for who, said in turns)
    return text if len(text) >= MIN_CHARS else ""


def records(path: str | None = None, limit: int | None = None) -> Iterator[dict]:
    f = _file(path)
    # the installed package as imported, not the virtualenv's folder, so corpora built anywhere are equal
    origin = "chitchat_dataset/dataset.json" if path is None else str(f)
    with open(f, encoding="utf-8") as fh:
        data = json.load(fh)
    for conv_id in sorted(data):  # sorted: the JSON's order is an accident of how it was dumped
        conv = data[conv_id]
        text = conversation_text(conv.get("messages", []))
        if text:
            title = " ".join(str(conv.get("prompt") or "").split()) or "conversation"
            yield {"id": f"chitchat:{conv_id}", "title": title, "text": text, "origin": origin}
