"""FOLDOC (Free On-line Dictionary of Computing) from Debian's dict-foldoc dictd database.

Design choices:
- dictd layout: `foldoc.index` lines are "headword<TAB>offset<TAB>length" with offset/length in
  dictd's base64 digits; `foldoc.dict.dz` is dictzip, which is plain gzip to `gzip.open`, so the
  whole 8 MB body is read once and sliced.
- Several headwords point at the same body (synonyms); one record per distinct body, titled by
  the body's first line (FOLDOC's primary headword), other headwords listed as "Also:".
- Cross-reference braces ("{reduction system}") and the trailing "(1994-12-16)" edit date are
  removed; wrapped prose paragraphs are re-joined, indented code/examples are kept as lines.
- `00-database-*` entries (dictd metadata) are skipped.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator
from pathlib import Path

from source.corpus import dpkg_version

DEFAULT_PATH = "/usr/share/dictd"
INSTALL_HINT = "apt-get install dict-foldoc"
B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
DATE = re.compile(r"\s*\(\d{4}-\d{2}-\d{2}\)\s*")  # last-edit stamp, a paragraph of its own


def missing(path: str | None) -> str | None:
    root = Path(path or DEFAULT_PATH)
    absent = [f.name for f in input_files(str(root)) if not f.is_file()]
    return f"{', '.join(absent)} not found in {root}" if absent else None


def input_files(path: str | None) -> list[Path]:
    root = Path(path or DEFAULT_PATH)
    return [root / "foldoc.index", root / "foldoc.dict.dz"]


def version() -> str | None:
    return dpkg_version("dict-foldoc")


def b64(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + B64[c]
    return n


def entries(index: Path) -> Iterator[tuple[str, int, int]]:
    """(headword, offset, length) in index order."""
    with open(index, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if len(fields) >= 3 and not fields[0].startswith("00-database"):
                yield fields[0], b64(fields[1]), b64(fields[2])


def tidy_body(body: str) -> tuple[str, list[str], str]:
    """Raw dictd entry -> (primary headword, other headwords, text)."""
    head, _, rest = body.partition("\n\n")
    names = [h.strip() for h in head.splitlines() if h.strip()]
    rest = re.sub(r"\{([^{}]*)\}", r"\1", rest)  # {cross reference} -> cross reference
    paras = []
    for para in re.split(r"\n\s*\n", rest):
        if DATE.fullmatch(para):
            continue
        lines = [ln[3:] if ln.startswith("   ") else ln.lstrip() for ln in para.splitlines()]
        if all(not ln.startswith(" ") for ln in lines):
            paras.append(" ".join(ln.strip() for ln in lines))  # wrapped prose: one line
        else:
            paras.append("\n".join(lines))  # indented example or code: keep the layout
    return (names[0] if names else ""), names[1:], "\n\n".join(p for p in paras if p.strip())


def records(path: str | None = None, limit: int | None = None) -> Iterator[dict]:
    index, dz = input_files(path)
    with gzip.open(dz) as f:  # dictzip is gzip with a random-access table we don't need
        data = f.read()
    seen_bodies, seen_ids = set(), {}
    for headword, off, length in entries(index):
        if (off, length) in seen_bodies:
            continue
        seen_bodies.add((off, length))
        title, others, text = tidy_body(data[off:off + length].decode("utf-8", "replace"))
        title = title or headword
        if not text:
            continue
        key = f"foldoc:{title}"
        seen_ids[key] = seen_ids.get(key, 0) + 1
        if seen_ids[key] > 1:  # e.g. "Ada" the language and "ADA" the company
            key = f"{key}#{seen_ids[key]}"
        also = f" (also: {', '.join(others)})" if others else ""
        yield {"id": key, "title": title, "text": f"{title}{also}\n\n{text}", "origin": str(index)}
