"""Standard-library docstrings, harvested with `inspect` over `sys.stdlib_module_names`.

Design choices:
- The harvest runs in a child interpreter (this file run as a script). Importing ~480 modules has
  side effects (signal handlers, warnings filters, modules that print or touch the terminal); a
  child keeps them out of the builder process and its stdout is never our data channel: the
  records go to a temporary JSON-lines file.
- Outputs must be byte-identical across rebuilds and machines with the same Python: the child is the
  base interpreter (not a virtualenv's), started with -S (no site-packages, so setuptools' copy of
  distutils cannot shadow the stdlib one) and a fixed environment with `PYTHONHASHSEED=0` (reprs of
  sets in signatures). Defaults that depend on the machine are written as the expression that
  produced them (`environ=os.environ`, `executable=sys.executable`): the build machine's environment
  variables, which may hold secrets, must never reach the corpus. Object addresses are cut.
- GUI, test, interactive and "does something on import" modules are skipped (list below), as are
  private names and names re-exported from another package (they get their own record there).
- Deduplicated by docstring text: inherited/shared docs ("Return self==value.") appear once.
- Text is "qualname(signature)\\n\\ndocstring", the way Sphinx renders an API entry.
This file imports only the standard library because it runs as a plain script.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import platform
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

DEFAULT_PATH = None  # the running interpreter's standard library
INSTALL_HINT = "part of Python itself"
MIN_DOC_CHARS = 15  # shorter docs ("Return state.") teach nothing

SKIP = {"antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle", "__main__", "lib2to3",
        "ensurepip", "venv", "test", "pydoc_data", "xxsubtype", "xxlimited", "msilib", "winreg",
        "winsound", "msvcrt", "nt", "idle", "pty", "tty", "crypt", "nis", "spwd", "ossaudiodev",
        "curses", "readline", "sqlite3.__main__", "asyncio.__main__", "json.tool", "pip",
        "setuptools", "_distutils_hack"}


def missing(path: str | None) -> str | None:
    return None  # the standard library is always there


def input_files(path: str | None) -> list[Path]:
    return []  # nothing on disk to hash: the builder hashes the harvested records instead


def version() -> str:
    return platform.python_version()


def records(path: str | None = None, limit: int | None = None) -> Iterator[dict]:
    """Run the harvest in a child interpreter and yield its records."""
    env = {"PYTHONHASHSEED": "0", "PYTHONWARNINGS": "ignore", "LC_ALL": "C.UTF-8", "PATH": os.defpath}
    python = getattr(sys, "_base_executable", None) or sys.executable  # outside any virtualenv
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "docstrings.jsonl"
        # -S: no site-packages at all; -P: don't put this folder on sys.path. Only stdlib is wanted.
        cmd = [python, "-S", "-P", "-s", __file__, str(out), str(limit or 0)]
        proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"docstring harvest failed:\n{proc.stderr[-2000:]}")
        with open(out, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


# ----------------------------------------------------------------------------- child side

@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def _import(name: str):
    try:
        with _quiet():
            return importlib.import_module(name)
    except BaseException:  # SystemExit, missing C extensions, platform-only modules
        return None


def module_names() -> list[str]:
    """Public stdlib modules and their public submodules, in a stable order."""
    names = []
    for root in sorted(sys.stdlib_module_names):
        if root in SKIP or root.startswith("_"):
            continue
        mod = _import(root)
        if mod is None:
            continue
        names.append(root)
        if not hasattr(mod, "__path__"):
            continue
        try:
            with _quiet():
                subs = [i.name for i in pkgutil.walk_packages(mod.__path__, root + ".", onerror=lambda _: None)]
        except BaseException:
            continue
        for name in sorted(subs):
            parts = name.split(".")
            if name in SKIP or any(p.startswith("_") for p in parts[1:]) \
                    or any(p in ("test", "tests", "testing", "conftest") for p in parts):
                continue
            names.append(name)
    return names


class _Expression:
    """A default value shown as the expression that produced it."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _machine_defaults() -> dict[object, str]:
    """Default values that differ between machines, by the expression that made them."""
    named = {"sys.executable": sys.executable, "sys.prefix": sys.prefix, "sys.exec_prefix": sys.exec_prefix,
             "sys.base_prefix": sys.base_prefix, "sys.base_exec_prefix": sys.base_exec_prefix}
    return {value: name for name, value in reversed(named.items()) if value}


def _signature(obj) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    machine = _machine_defaults()
    params = []
    for p in sig.parameters.values():
        if p.default is os.environ or p.default is os.environb:
            p = p.replace(default=_Expression("os.environ" if p.default is os.environ else "os.environb"))
        elif isinstance(p.default, str) and p.default in machine:
            p = p.replace(default=_Expression(machine[p.default]))
        params.append(p)
    text = str(sig.replace(parameters=params))
    # Default values like <Parser object at 0x7f...> differ every run; drop the address.
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)


def harvest(limit: int = 0) -> list[dict]:
    recs, seen_docs, seen_names = [], set(), set()

    def add(qual: str, obj, kind: str, module: str) -> None:
        doc = inspect.getdoc(obj)
        if not doc or len(doc) < MIN_DOC_CHARS or doc in seen_docs or qual in seen_names:
            return
        seen_docs.add(doc)
        seen_names.add(qual)
        head = {"module": f"Module {qual}", "class": f"class {qual}{_signature(obj)}"}.get(
            kind, f"{qual}{_signature(obj)}")
        recs.append({"id": f"docstring:{qual}", "title": qual, "text": f"{head}\n\n{doc}", "origin": module})

    for mn in module_names():
        m = _import(mn)
        if m is None:
            continue
        add(mn, m, "module", mn)
        public = getattr(m, "__all__", None)
        names = public if isinstance(public, (list, tuple)) else [n for n in dir(m) if not n.startswith("_")]
        for n in names:
            try:
                obj = getattr(m, n)
            except BaseException:
                continue
            home = str(getattr(obj, "__module__", "") or "")
            if inspect.ismodule(obj) or (home and home.split(".")[0] != mn.split(".")[0]):
                continue  # re-exported from elsewhere: recorded in its home module
            if inspect.isclass(obj):
                add(f"{mn}.{n}", obj, "class", mn)
                for an, av in vars(obj).items():
                    if an.startswith("_"):
                        continue
                    if isinstance(av, (staticmethod, classmethod)):
                        av = av.__func__
                    elif isinstance(av, property):
                        av = av.fget or av
                    if callable(av):
                        add(f"{mn}.{n}.{an}", av, "method", mn)
            elif callable(obj):
                add(f"{mn}.{n}", obj, "function", mn)
        if limit and len(recs) >= limit:
            break
    return recs[:limit] if limit else recs


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    out_path, lim = sys.argv[1], int(sys.argv[2])
    result = harvest(lim)
    with open(out_path, "w", encoding="utf-8") as f:
        for r in result:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
