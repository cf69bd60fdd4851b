"""What the Python manual says about an API, for the index to file under that API's docstring record.

People ask how to do something in their own words ("glue a directory and a file name together"),
while a docstring is terse ("Join two or more pathname components"). The manual's entry for the
same function usually says more, in other words, under a section heading that names the task
("Common pathname manipulations"). `builder index build` adds those words to the docstring
record's first passage, so a question that matches the manual's wording also finds the docstring;
the passage text shown to the model does not change.

Design choices:
- Entries are read from the layout the python-docs and pydoc-topics readers write: a signature line
  ("os.path.join(path, *paths)", "class list([iterable])") followed by a more deeply indented
  description. An entry indented inside a class entry is that class's member ("sort(...)" inside
  "class list" is "list.sort").
- A docstring names where a function lives (posixpath.join, builtins.list.reverse, posix.listdir);
  the manual names it as people import it (os.path.join, list.reverse, os.listdir): `ALIASES`.
- A page documents "class pathlib.Path" and then "Path.glob(pattern)": a member named by the short
  class name is filed under the class's full name.
- The first entry found for a name wins, library reference pages before the rest of the manual.
- Anchors: the headings of the manual's sections whose text mentions an API ("How do I delete a
  file? (And other file questions...)" mentions shutil.rmtree; "File Wildcards" mentions glob.glob)
  are also filed under its docstring, the way a web page is found by the words of the links to it.
  A mention is the name's last two parts as the text spells them ("os.path.join" -> "path.join",
  "str.join", "Path.iterdir"), matched within every dotted chain of the text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_CHAIN = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")  # os.path.join, str.join, Path.iterdir
_ENTRY = re.compile(r"( *)(?:(class|exception) ([A-Za-z_][\w.]*)(?:\(.*\))?|([A-Za-z_][\w.]*)\(.*\))\s*")
# where the stdlib defines a name -> how the manual spells it
ALIASES = (("builtins.", ""), ("posixpath.", "os.path."), ("ntpath.", "os.path."), ("genericpath.", "os.path."),
           ("posix.", "os."))
MANUAL_SOURCES = ("python-docs", "pydoc-topics")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def entries_in(text: str, heading: str) -> Iterable[tuple[str, str]]:
    """(qualified name, heading + signature + description) for every manual entry in one record."""
    lines = text.split("\n")
    classes: list[tuple[int, str]] = []  # (indent, name) of the class entries we are inside
    i = 0
    while i < len(lines):
        m = _ENTRY.fullmatch(lines[i])
        if not m:
            i += 1
            continue
        indent, kind, name = len(m.group(1)), m.group(2), m.group(3) or m.group(4)
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j == len(lines) or _indent(lines[j]) <= indent:  # a signature with no description of its own
            i += 1
            continue
        body = []
        while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > indent):
            body.append(lines[j].strip())
            j += 1
        while classes and classes[-1][0] >= indent:
            classes.pop()
        if classes and "." not in name:
            name = f"{classes[-1][1]}.{name}"
        if kind == "class":
            classes.append((indent, name))
        yield name, "\n".join([heading, lines[i].strip(), *(b for b in body if b)])
        i += 1  # members of a class are entries inside its body


def manual_entries(records: Iterable[dict]) -> dict[str, str]:
    """{qualified name: entry text} over the manual's records (python-docs, pydoc-topics)."""
    pages: dict[str, list[dict]] = {}
    for r in records:
        if r["source"] in MANUAL_SOURCES:
            pages.setdefault(r.get("origin") or r["id"], []).append(r)
    found: dict[str, tuple[int, str, str]] = {}
    for origin in sorted(pages):
        rank = 0 if "/library/" in origin else 1
        page = [e for r in sorted(pages[origin], key=lambda r: r["id"]) for e in entries_in(r["text"], r["title"])]
        full = {name.rsplit(".", 1)[1]: name for name, _ in page if "." in name and name[:1].islower()}
        for name, entry in page:
            head, _, rest = name.partition(".")
            if rest and head in full:
                name = f"{full[head]}.{rest}"
            if name not in found or (rank, origin) < found[name][:2]:
                found[name] = (rank, origin, entry)
    return {name: entry for name, (_, _, entry) in found.items()}


def manual_names(qualname: str) -> list[str]:
    """The names the manual may use for a docstring record's qualified name, most specific first."""
    names = [qualname]
    for prefix, replacement in ALIASES:
        if qualname.startswith(prefix):
            names.append(replacement + qualname[len(prefix):])
    return names


def manual_entry(qualname: str, entries: dict[str, str]) -> str:
    """The manual's entry for a docstring record, or ""."""
    return next((entries[n] for n in manual_names(qualname) if n in entries), "")


def mention_key(name: str) -> str:
    """The last two parts of a dotted name ("os.path.join" -> "path.join"); "" for one part."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if len(parts) > 1 else ""


def anchor_table(records: Iterable[dict]) -> dict[str, list[str]]:
    """mention key -> the titles (section headings) of the manual's records whose text mentions it,
    each once, in record order."""
    out: dict[str, dict[str, None]] = {}
    for r in records:
        if r["source"] not in MANUAL_SOURCES:
            continue
        for chain in dict.fromkeys(_CHAIN.findall(r["text"])):
            parts = chain.split(".")
            for a, b in zip(parts, parts[1:]):
                out.setdefault(f"{a}.{b}", {})[r["title"]] = None
    return {k: list(v) for k, v in out.items()}


def manual_anchors(qualname: str, anchors: dict[str, list[str]]) -> list[str]:
    """The headings of the manual sections that mention a docstring record's API, or []."""
    return next((anchors[k] for k in map(mention_key, manual_names(qualname)) if k in anchors), [])
