"""Your own files, added with `builder data build --add PATH` (a file or a directory, repeatable).

Supported: .txt .md .rst (plain text), .jsonl (one JSON object a line: {"text": ...} or a chat
{"messages": [{"role", "content"}, ...]}), .parquet (a "text" column; "title" used if present).

Design choices:
- A directory is walked in sorted order; hidden paths and other extensions are skipped quietly,
  but a file named explicitly must have a supported extension (a typo should not pass silently).
- Mistakes raise `CorpusError` naming the file and line ("notes.jsonl:7: not valid JSON ..."):
  the builder stops rather than training on half a file.
- Plain-text files are cut at paragraph breaks into records of at most CHUNK_CHARS, so dedup and
  retrieval work at a sensible grain; ids are "user:<relpath>:<n>" with n the chunk number, the
  JSONL line number or the Parquet row number, which stay stable when unrelated files change.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from source.corpus import CorpusError
from source.sft_format import decode_line, parse_json_line

DEFAULT_PATH = None
INSTALL_HINT = "check the path given to --add"
TEXT_EXT = {".txt", ".md", ".rst"}
EXTENSIONS = TEXT_EXT | {".jsonl", ".parquet"}
CHUNK_CHARS = 16_000


def missing(path: str | None) -> str | None:
    if not path:
        return "no path given"
    return None if Path(path).exists() else f"{path} not found"


def input_files(path: str | None) -> list[Path]:
    root = Path(path)
    if root.is_file():
        if root.suffix.lower() not in EXTENSIONS:
            raise CorpusError(f"{root}: unsupported file type {root.suffix or '(none)'} "
                              f"(supported: {', '.join(sorted(EXTENSIONS))})")
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def version() -> None:
    return None


def records(path: str | None = None, limit: int | None = None) -> Iterator[dict]:
    root = Path(path)
    for f in input_files(path):
        rel = f.name if root.is_file() else f.relative_to(root).as_posix()
        ext = f.suffix.lower()
        reader = read_text if ext in TEXT_EXT else read_jsonl if ext == ".jsonl" else read_parquet
        for n, title, text in reader(f):
            yield {"id": f"user:{rel}:{n}", "title": title or rel, "text": text, "origin": str(f)}


def read_text(f: Path) -> Iterator[tuple[int, str, str]]:
    raw = f.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise CorpusError(f"{f}:{line}: not valid UTF-8 (byte {e.start}); save the file as UTF-8") from None
    chunk, size, n = [], 0, 0
    for para in re.split(r"\n\s*\n", text):
        if size + len(para) > CHUNK_CHARS and chunk:
            yield n, "", "\n\n".join(chunk)
            chunk, size, n = [], 0, n + 1
        chunk.append(para)
        size += len(para) + 2
    if "".join(chunk).strip():
        yield n, "", "\n\n".join(chunk)


def chat_text(messages: object, where: str) -> str:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise CorpusError(f'{where}: "messages" must be a list of {{"role": ..., "content": ...}} objects')
    turns = []
    for m in messages:
        content = m.get("content")
        if not isinstance(content, str):
            raise CorpusError(f'{where}: every message needs a string "content"')
        turns.append(f"{str(m.get('role', 'user')).capitalize()}: {content}")
    return "\n".join(turns)


def read_jsonl(f: Path) -> Iterator[tuple[int, str, str]]:
    offset = 0
    with open(f, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where, start, offset = f"{f}:{lineno}", offset, offset + len(raw)
            try:  # the same line reader as `builder sft-data --add`, so both name line and byte alike
                line = decode_line(raw, start).strip()
                if not line:
                    continue
                obj = parse_json_line(line)
            except ValueError as e:
                raise CorpusError(f"{where}: {e}") from None
            if not isinstance(obj, dict):
                raise CorpusError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if isinstance(obj.get("text"), str):
                text = obj["text"]
            elif "messages" in obj:
                text = chat_text(obj["messages"], where)
            else:
                raise CorpusError(f'{where}: needs a string "text" field or a "messages" list')
            title = obj.get("title") if isinstance(obj.get("title"), str) else ""
            yield lineno, title, text


def read_parquet(f: Path) -> Iterator[tuple[int, str, str]]:
    try:
        pf = pq.ParquetFile(f)
    except Exception as e:  # pyarrow raises several types for "not a Parquet file"
        raise CorpusError(f"{f}: cannot read as Parquet ({e})") from None
    names = pf.schema_arrow.names
    if "text" not in names:
        raise CorpusError(f"{f}: no 'text' column (columns: {', '.join(names) or 'none'})")
    columns = ["text"] + (["title"] if "title" in names else [])
    row = 0
    for batch in pf.iter_batches(columns=columns):
        cols = batch.to_pydict()
        for i, text in enumerate(cols["text"]):
            if text is not None:
                if not isinstance(text, str):
                    raise CorpusError(f"{f}: row {row + i}: 'text' must be a string column")
                title = cols.get("title", [None] * len(cols["text"]))[i]
                yield row + i, str(title or ""), text
        row += batch.num_rows
