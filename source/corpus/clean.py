"""Text cleaning: the same bytes for the same meaning, before dedup compares anything.

Design choices:
- Unicode NFC, so "é" composed and "e + combining acute" are one string (and one token sequence).
- Control characters are dropped except newline and tab (tabs matter in code); CR/LF -> LF;
  byte-order marks, zero-width spaces and no-break spaces are normalised away.
- Whitespace is tidied, not flattened: trailing spaces go, runs of blank lines become one blank
  line, but indentation stays (code blocks and chat turns depend on it).
- A record whose text is empty afterwards is dropped; nothing else is judged here.
"""

from __future__ import annotations

import re
import unicodedata

# C0/C1 controls except \t and \n, plus DEL; BOM and zero-width space/joiners handled separately.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
INVISIBLE = re.compile(r"[\ufeff\u200b\u2060]")
SPACES = re.compile(r"[\u00a0\u2000-\u200a\u202f\u205f\u3000]")
TRAILING = re.compile(r"[ \t]+$", re.M)
BLANKS = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text)
    text = CONTROL.sub("", text)
    text = INVISIBLE.sub("", text)
    text = SPACES.sub(" ", text)
    text = TRAILING.sub("", text)
    text = BLANKS.sub("\n\n", text)
    return text.strip()


def clean_records(records: list[dict]) -> list[dict]:
    """Clean text and title in place; return the records that still have text."""
    kept = []
    for r in records:
        r["text"] = clean_text(r["text"])
        r["title"] = " ".join(clean_text(r.get("title") or "").split())
        if r["text"].strip():
            kept.append(r)
    return kept
