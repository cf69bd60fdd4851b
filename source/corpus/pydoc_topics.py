"""pydoc topics: the language-reference pages that `help("for")` shows, from `pydoc_data.topics`.

Design choices: one record per topic key (79 in 3.11), text as shipped (it is already plain text
rendered from the reference manual). The module file is hashed so the manifest pins its content.
"""

from __future__ import annotations

import importlib.util
import platform
from collections.abc import Iterator
from pathlib import Path

DEFAULT_PATH = None  # the running interpreter's pydoc_data package
INSTALL_HINT = "part of Python itself (pydoc_data)"


def _module_file() -> Path | None:
    spec = importlib.util.find_spec("pydoc_data.topics")
    return Path(spec.origin) if spec and spec.origin else None


def missing(path: str | None) -> str | None:
    return None if _module_file() else "pydoc_data.topics not importable"


def input_files(path: str | None) -> list[Path]:
    f = _module_file()
    return [f] if f else []


def version() -> str:
    return platform.python_version()


def records(path: str | None = None, limit: int | None = None) -> Iterator[dict]:
    from pydoc_data.topics import topics

    origin = "pydoc_data/topics.py"  # as imported: the interpreter's install folder differs between machines
    for key in sorted(topics):
        yield {"id": f"pydoc:topic:{key}", "title": key, "text": topics[key], "origin": origin}
