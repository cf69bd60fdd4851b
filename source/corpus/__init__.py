"""Corpus stage: installed sources -> cleaned, deduplicated, PII-scrubbed Parquet shards.

One module per source, each exposing the same names, so `build.py` can treat them alike:

    DEFAULT_PATH        where the source lives when the recipe gives no `path`
    INSTALL_HINT        what to run when it is missing (printed in the one-line "skipped" message)
    missing(path)       -> None if usable, else a short reason ("/usr/share/wordnet not found")
    input_files(path)   -> files whose bytes are hashed into the manifest (sorted order)
    version()           -> Debian/PyPI/Python version string, or None
    records(path, limit) -> iterator of dicts with id, title, text, origin (source and license
                           are added by the builder); `limit` is a hint, the builder also cuts

Then the pipeline modules: clean -> dedup (exact, near) -> pii, and `build` which orchestrates and
writes the manifest. Everything here is library code: no Click, no printing except the one
"skipped ..." line, and errors are `CorpusError` so the CLI can turn them into tidy messages.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path


class CorpusError(Exception):
    """A user-facing problem (bad file, bad recipe, empty corpus). Message names file and line."""


def sha256_files(files: Iterable[Path], root: Path | None = None) -> str:
    """Hash the (relative name, bytes) of files in sorted order: renames and edits both show."""
    h = hashlib.sha256()
    for f in sorted(Path(p) for p in files):
        name = str(f.relative_to(root)) if root is not None and f.is_relative_to(root) else f.name
        h.update(name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def dpkg_version(package: str) -> str | None:
    """Installed Debian package version, or None off Debian / when not installed."""
    if shutil.which("dpkg-query") is None:
        return None
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None
