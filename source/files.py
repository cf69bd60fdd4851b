"""Small file helpers shared by every stage: atomic writes and content hashes (no torch import).

Atomic means: write a temporary file in the target folder, fsync it, give it the usual permissions,
then `os.replace` it over the target, so a reader or a crash sees the old file or the new one,
never half of one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def umask_mode() -> int:
    # mkstemp creates files 0600; a renamed-into-place file should get the usual permissions
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir(new: str | Path, dest: str | Path) -> None:
    """Move the finished folder `new` to `dest`, replacing what is there: the old folder is renamed
    aside first and deleted only after the new one is in place, so `dest` is never half-written."""
    new, dest = Path(new), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        os.replace(new, dest)
        return
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dest, old)
    os.replace(new, dest)
    shutil.rmtree(old)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
