"""The SFT example format: validation of user-brought JSONL and atomic JSONL writes.

Two input formats are accepted, one is stored:
- {"messages": [{"role", "content"}...], "context": [passages] (optional), "meta": {...}} (stored);
- {"instruction", "input"?, "output", "context"?} (what users often bring), converted on load.
A bad example raises ValueError("field: problem"); `load_examples` prefixes "file:line: ", so a user
can fix their file without reading our code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

ROLES = ("system", "user", "assistant")

def from_instruction(obj: dict) -> dict:
    """{"instruction", "input"?, "output"} -> the messages format."""
    user = obj["instruction"].strip()
    if (obj.get("input") or "").strip():
        user += "\n\n" + obj["input"].strip()
    out = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]}
    if obj.get("context"):
        out["context"] = obj["context"]
    return out


def _nonempty(obj: dict, key: str, where: str) -> None:
    if not isinstance(obj.get(key), str) or not obj[key].strip():
        raise ValueError(f"{where}{key}: {'missing' if key not in obj else 'must be a non-empty string'}")


def _optional_strings(obj: dict, keys: tuple[str, ...], where: str, allow_null: bool = True) -> None:
    for key in keys:
        if key in obj and not isinstance(obj[key], str) and not (allow_null and obj[key] is None):
            raise ValueError(f"{where}{key}: must be a string, got {type(obj[key]).__name__}")


def check_example(obj) -> dict:
    """Validate one example in either format; return it in the messages format.

    Raises ValueError("field: problem"), e.g. "messages[1].role: 'bot' is not one of system, ...".
    """
    if not isinstance(obj, dict):
        raise ValueError(f"example: expected a JSON object, got {type(obj).__name__}")
    if "messages" not in obj and "instruction" in obj:
        _nonempty(obj, "instruction", "")
        _nonempty(obj, "output", "")
        if not isinstance(obj.get("input", ""), (str, type(None))):
            raise ValueError("input: must be a string")
        obj = {**from_instruction(obj), "meta": obj.get("meta")}
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ValueError('messages: missing (need "messages" or "instruction" + "output")'
                         if msgs is None else "messages: must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}]: must be an object with role and content")
        if m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}].role: {m.get('role')!r} is not one of {', '.join(ROLES)}")
        if m["role"] == "system" and i:
            raise ValueError(f"messages[{i}].role: a system message may only come first")
        _nonempty(m, "content", f"messages[{i}].")
    if not any(m["role"] == "user" for m in msgs):
        raise ValueError("messages: no user message")
    if msgs[-1]["role"] != "assistant":
        raise ValueError(f"messages[{len(msgs) - 1}].role: the last message must be the assistant's reply")
    ctx = obj.get("context")
    if ctx is not None:
        if not isinstance(ctx, list):
            raise ValueError("context: must be a list of passages")
        for i, p in enumerate(ctx):
            if not isinstance(p, dict):
                raise ValueError(f"context[{i}]: must be an object with a text")
            _nonempty(p, "text", f"context[{i}].")
            _optional_strings(p, ("title", "source", "id"), f"context[{i}].")
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    _optional_strings(meta, ("kind", "entity", "source"), "meta.", allow_null=False)  # counted and sorted as text
    meta = {"kind": "user", "entity": "", "source": "user", "gold": None, **meta}
    out = {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs], "meta": meta}
    if ctx:
        out["context"] = ctx
    return out


def decode_line(raw: bytes, offset: int) -> str:
    """One line of a user file as text. Decoding is per line, so a bad byte names its line and byte offset
    and `--skip-bad` can skip that line alone (decoding the whole file failed before a line was known)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 (byte {offset + e.start} of the file, {raw[e.start:e.start + 1]!r}); "
                         "save the file as UTF-8") from None


def parse_json_line(line: str):
    """json.loads with the failures a user file can cause turned into ValueError("invalid JSON ...")."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:  # "[[[[..." thousands deep: the parser's recursion limit, not a bug of ours
        raise ValueError("invalid JSON (nested too deeply)") from None
    try:  # "\ud800" escapes decode to lone surrogates, which no later UTF-8 write can encode
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("a string holds an unpaired surrogate escape (like \\ud800), which is not text") from None
    return obj


def load_checked_lines(path: str | os.PathLike, check: Callable[[dict], dict],
                       skip_bad: bool = False) -> tuple[list[dict], int]:
    """check(obj) of each non-empty line of a JSONL file. A bad line (bad UTF-8, bad JSON, or `check`
    raising ValueError) raises ValueError("file:line: field: problem"), or with `skip_bad` is skipped and
    counted. Returns (checked objects, n_bad)."""
    out, bad, offset = [], 0, 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            try:
                line = decode_line(raw, start)
                if line.strip():
                    out.append(check(parse_json_line(line)))
            except ValueError as e:
                if not skip_bad:
                    raise ValueError(f"{path}:{n}: {e}") from None
                bad += 1
    return out, bad


def load_examples(path: str | os.PathLike, skip_bad: bool = False) -> tuple[list[dict], int]:
    """Examples of a JSONL file (either format), checked line by line (load_checked_lines)."""
    return load_checked_lines(path, check_example, skip_bad)


def write_jsonl(path: str | os.PathLike, examples: list[dict]) -> None:
    """Write atomically: readers see the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
