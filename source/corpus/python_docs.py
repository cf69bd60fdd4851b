"""The Python manual from Debian's python3-doc: `_sources/**/*.rst.txt`, one record per section.

Design choices:
- Split at RST headings (a title line underlined, optionally overlined, with one punctuation
  character repeated); each section keeps its heading, so retrieval can cite "json: Basic Usage".
- Light RST -> text, the way Sphinx would render it, with regexes rather than docutils (not a
  dependency, and it knows none of Sphinx's roles and directives): roles become their text (code roles keep
  backticks, like Markdown), API directives become their signature line, admonitions become
  "Note:", "New in version 3.8." ..., and index/toctree/label/comment blocks are dropped.
- Sections with almost no body (a heading over a table of contents) are skipped.
- Ids are "python-docs:<relpath>#<slug of heading>", de-duplicated inside a file with -2, -3.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from source.corpus import dpkg_version

DEFAULT_PATH = "/usr/share/doc/python3.11/html/_sources"
INSTALL_HINT = "apt-get install python3-doc"
MIN_BODY_CHARS = 40

UNDERLINE = re.compile(r"([=\-~^\"*#+`'.:_<>])\1{2,}\s*")
DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s?(.*)$")
OPTION = re.compile(r"^\s+:[\w-]+:.*$")
ROLE = re.compile(r":([\w:-]+):`([^`]+)`")
LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`__?")
REF = re.compile(r"`([^`]+)`_(?!\w)")
FOOTREF = re.compile(r"\s?\[(#[\w-]*|\d+|\*)\]_")

# Blocks (the directive and its indented body) that carry no prose.
DROP = {"index", "toctree", "raw", "highlight", "testsetup", "testcleanup", "include", "literalinclude",
        "image", "figure", "tabularcolumns", "moduleauthor", "sectionauthor", "module", "currentmodule",
        "program", "contents", "audit-event", "c:namespace", "c:namespace-push", "c:namespace-pop"}
# API entries: the directive's argument is the signature Sphinx shows.
SIGNATURE = {"function": "", "method": "", "data": "", "attribute": "", "decorator": "@",
             "class": "class ", "exception": "exception ", "classmethod": "classmethod ",
             "staticmethod": "staticmethod ", "coroutinefunction": "coroutine ",
             "coroutinemethod": "coroutine ", "abstractmethod": "abstractmethod ", "describe": "",
             "object": "", "cmdoption": "", "option": "", "envvar": "", "opcode": "", "pdbcommand": ""}
ADMONITION = {"note": "Note:", "warning": "Warning:", "seealso": "See also:", "important": "Important:",
              "tip": "Tip:", "caution": "Caution:", "attention": "Attention:", "hint": "Hint:",
              "danger": "Danger:", "impl-detail": "CPython implementation detail:", "topic": "",
              "sidebar": "", "rubric": "", "admonition": "", "availability": "Availability:"}
VERSIONED = {"versionadded": "New in version {}.", "versionchanged": "Changed in version {}:",
             "deprecated": "Deprecated since version {}:",
             "deprecated-removed": "Deprecated since version {}, will be removed in version {}:"}
MODULE_LEVEL = {"function", "class", "exception", "data", "decorator", "coroutinefunction"}
CODE_ROLES = {"func", "meth", "class", "mod", "attr", "data", "exc", "obj", "const", "keyword",
              "c:func", "c:type", "c:macro", "c:member", "c:data", "c:var", "c:expr", "code",
              "samp", "file", "option", "envvar", "program", "opcode", "kbd", "makevar"}


def missing(path: str | None) -> str | None:
    root = Path(path or DEFAULT_PATH)
    if not root.is_dir():
        return f"{root} not found"
    return None if any(root.rglob("*.rst.txt")) else f"no *.rst.txt files under {root}"


def input_files(path: str | None) -> list[Path]:
    return sorted(Path(path or DEFAULT_PATH).rglob("*.rst.txt"))


def version() -> str | None:
    return dpkg_version("python3-doc")


def records(path: str | None = None, limit: int | None = None) -> Iterator[dict]:
    root = Path(path or DEFAULT_PATH)
    for f in input_files(str(root)):
        rel = f.relative_to(root).as_posix()
        yield from file_sections(f.read_text(encoding="utf-8", errors="replace"), rel, str(f))


# ----------------------------------------------------------------------------- sections

def _is_heading(lines: list[str], i: int) -> bool:
    """Is lines[i] the underline of a heading whose title is lines[i-1]?"""
    title = lines[i - 1].rstrip() if i > 0 else ""
    if not UNDERLINE.fullmatch(lines[i]) or not title.strip() or UNDERLINE.fullmatch(title):
        return False
    overlined = i >= 2 and lines[i - 2].strip() == lines[i].strip()
    if title[0].isspace() and not overlined:  # only overlined titles may be inset
        return False
    return len(lines[i].rstrip()) >= len(title) - 1  # RST wants the underline as long as the title


def file_sections(text: str, rel: str, origin: str) -> Iterator[dict]:
    lines = text.splitlines()
    heads = []  # (first line of the heading block, title, first body line)
    for i in range(1, len(lines)):
        if _is_heading(lines, i):
            start = i - 1
            if i >= 2 and lines[i - 2].strip() and lines[i - 2].strip() == lines[i].strip():
                start = i - 2  # overline
            heads.append((start, lines[i - 1].strip(), i + 1))
    page_title, slugs, state = None, {}, {"module": ""}
    for k, (_, raw_title, body_start) in enumerate(heads):
        body_end = heads[k + 1][0] if k + 1 < len(heads) else len(lines)
        title = plain_title(raw_title)
        page_title = page_title or title
        body = rst_to_text(lines[body_start:body_end], state).strip()
        slug = slugify(title) or "section"
        slugs[slug] = slugs.get(slug, 0) + 1
        if slugs[slug] > 1:
            slug = f"{slug}-{slugs[slug]}"
        if len(body) < MIN_BODY_CHARS:
            continue
        head = title if title == page_title else f"{title} ({page_title})"
        yield {"id": f"python-docs:{rel}#{slug}", "title": title, "text": f"{head}\n\n{body}", "origin": origin}


def slugify(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def plain_title(raw: str) -> str:
    return inline(raw).replace("`", "").replace("()", "")


# ----------------------------------------------------------------------------- RST -> text

def _role(m: re.Match) -> str:
    role, body = m.group(1), m.group(2)
    label = re.match(r"(.*?)\s*<[^>]*>$", body, re.S)  # :ref:`text <target>`
    if label and label.group(1):
        text = label.group(1)
    else:
        text = body.lstrip("!")
        if text.startswith("~"):
            text = text[1:].rsplit(".", 1)[-1]
    if role == "rfc":
        return f"RFC {text}"
    if role == "pep":
        return f"PEP {text}"
    if role in ("issue", "gh"):
        return f"{'bpo' if role == 'issue' else 'gh'}-{text}"
    if role in ("func", "meth", "c:func") and not text.endswith(")"):
        text += "()"
    return f"`{text}`" if role in CODE_ROLES else text


def inline(s: str) -> str:
    s = ROLE.sub(_role, s)
    s = LINK.sub(r"\1", s)
    s = s.replace("``", "`")
    s = REF.sub(r"\1", s)
    s = FOOTREF.sub("", s)
    s = re.sub(r"\*\*(\S(?:.*?\S)?)\*\*", r"\1", s)
    s = s.replace("\\ ", "").replace(" --- ", " — ")
    return s


def _block_end(lines: list[str], i: int, indent: int) -> int:
    """Index after the indented block that belongs to the directive at lines[i]."""
    j = i + 1
    while j < len(lines):
        ln = lines[j]
        if ln.strip() and len(ln) - len(ln.lstrip()) <= indent:
            break
        j += 1
    return j


def rst_to_text(lines: list[str], state: dict | None = None) -> str:
    """Sphinx-like plain text. `state["module"]` carries `.. module::` across sections so module-level
    functions read "json.dumps(...)", as Sphinx renders them."""
    state = state if state is not None else {"module": ""}
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        m = DIRECTIVE.match(line)
        if m:
            ind, name, arg = m.group(1), m.group(2), m.group(3).strip()
            i += 1
            while arg.endswith("\\") and i < len(lines):  # signature continued on the next line
                arg = arg[:-1].rstrip() + " " + lines[i].strip()
                i += 1
            while i < len(lines) and OPTION.match(lines[i]):
                i += 1  # :noindex:, :synopsis:, :linenos: ...
            if name in ("module", "currentmodule"):
                state["module"] = "" if arg == "None" else arg
            if name in DROP or (name.startswith("test") and name not in ("testcode", "testoutput")):
                i = _block_end(lines, i - 1, len(ind))
            elif name in SIGNATURE or name.startswith("c:"):
                if state["module"] and not ind and name in MODULE_LEVEL and "." not in arg.split("(")[0]:
                    arg = f"{state['module']}.{arg}"
                out.append(ind + SIGNATURE.get(name, "") + arg)
            elif name in VERSIONED:
                nums = arg.split(None, 2 if name == "deprecated-removed" else 1)
                n_ver = 2 if name == "deprecated-removed" else 1
                head = VERSIONED[name].format(*(nums + ["?", "?"])[:n_ver])
                rest = " ".join(nums[n_ver:])
                out.append(ind + (f"{head} {rest}" if rest else head))
            elif name in ADMONITION:
                head = " ".join(x for x in (ADMONITION[name], arg) if x)
                if head:
                    out.append(ind + head)
            elif arg and name not in ("code-block", "sourcecode", "code", "highlight", "productionlist"):
                out.append(ind + arg)
            continue  # other directives (code-block, doctest, only ...): keep the body only
        stripped = line.strip()
        if stripped.startswith(".."):
            fn = re.match(r"\.\. \[(#[\w-]*|\d+|\*)\]\s*(.*)", stripped)
            if fn:  # footnote: keep its text
                out.append(fn.group(2))
                i += 1
                continue
            # label, substitution definition, or comment: drop with its indented block
            i = _block_end(lines, i, len(line) - len(line.lstrip()))
            continue
        if stripped == "::":
            i += 1
            continue
        if line.rstrip().endswith("::"):
            line = line.rstrip()[:-1] if not line.rstrip().endswith(" ::") else line.rstrip()[:-3]
        if UNDERLINE.fullmatch(line) and not (i > 0 and lines[i - 1].strip()):
            i += 1  # transition line (----) between paragraphs
            continue
        out.append(line)
        i += 1
    return inline("\n".join(out))  # roles and links may span lines
