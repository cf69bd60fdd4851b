"""Corpus build: recipe -> read sources -> clean -> exact dedup -> near dedup -> PII -> split -> Parquet.

Design choices:
- A recipe (JSON) lists sources in priority order; dedup keeps the first copy, so order matters.
- Missing optional sources are skipped with one line on stderr and "status": "skipped" in the
  manifest; user-supplied paths (--add) that are missing or malformed are errors.
- Weight is a mix weight applied to the *train* split only: each record appears floor(w) times,
  plus once more with probability frac(w) (decided by a seeded hash of its id). 1.0 = as is,
  2.0 = twice, 0.5 = about half, 0 = source off. Validation records are never repeated.
- The train/val split hashes (seed, id), so a record's split does not depend on what else is in
  the corpus; train rows are then shuffled with the seed. Same inputs + seed -> same bytes.
- Output: OUT/train-NNNNN.parquet (ROWS_PER_SHARD rows each), OUT/val-00000.parquet, and
  OUT/manifest.json with per-step counts, input and output sha256. Files are written to a temp
  name and `os.replace`d; shards left over from a bigger earlier build are removed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from source.corpus import (CorpusError, chitchat, clean, dedup, docstrings, foldoc, pii, pydoc_topics,
                           python_docs, sha256_files, user_files, wordnet)
from source.files import atomic_write_bytes

SOURCES = {"docstrings": docstrings, "pydoc-topics": pydoc_topics, "python-docs": python_docs,
           "wordnet": wordnet, "foldoc": foldoc, "chitchat": chitchat, "user": user_files}
SOURCE_KEYS = {"name", "reader", "weight", "license", "path", "description"}
COLUMNS = ["id", "source", "title", "text", "license", "origin"]
SCHEMA = pa.schema([pa.field(c, pa.string(), nullable=False) for c in COLUMNS])
ROWS_PER_SHARD = 50_000
STEPS = ["raw", "after_clean", "after_exact_dedup", "after_near_dedup", "after_pii"]


# ----------------------------------------------------------------------------- recipe

def _line_of(text: str, needle: str) -> int | None:
    pos = text.find(needle)
    return text.count("\n", 0, pos) + 1 if pos >= 0 else None


def load_recipe(path: str | Path) -> dict:
    """Parse and check a recipe; errors say "file:line: what is wrong"."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise CorpusError(f"{path}: cannot read recipe ({e.strerror or e})") from None
    try:
        recipe = json.loads(text)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None

    def fail(msg: str, needle: str = "") -> None:
        line = _line_of(text, needle) if needle else None
        raise CorpusError(f"{path}:{line}: {msg}" if line else f"{path}: {msg}")

    if not isinstance(recipe, dict) or not isinstance(recipe.get("sources"), list) or not recipe["sources"]:
        fail('a recipe is a JSON object with a non-empty "sources" list')
    names = set()
    for i, s in enumerate(recipe["sources"]):
        if not isinstance(s, dict) or not isinstance(s.get("name"), str):
            fail(f'sources[{i}]: each source is an object with a "name"')
        name = s["name"]
        needle = f'"{name}"'
        if unknown := set(s) - SOURCE_KEYS:
            fail(f"source {name!r}: unknown key(s) {', '.join(sorted(unknown))} "
                 f"(allowed: {', '.join(sorted(SOURCE_KEYS))})", f'"{sorted(unknown)[0]}"')
        if s.get("reader", name) not in SOURCES:
            fail(f"unknown source {s.get('reader', name)!r} (known: {', '.join(SOURCES)}; "
                 f'set "reader" to use one under another name)', needle)
        if name in names:
            fail(f"source {name!r} is listed twice", needle)
        names.add(name)
        weight = s.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0 or math.isnan(weight):
            fail(f"source {name!r}: weight must be a number >= 0, got {weight!r}", needle)
        if not isinstance(s.get("license", ""), str) or not isinstance(s.get("path", ""), str):
            fail(f'source {name!r}: "license" and "path" must be strings', needle)
        if s.get("reader", name) == "user" and not s.get("path"):
            fail(f'source {name!r}: a "user" source needs a "path"', needle)
    return recipe


# ----------------------------------------------------------------------------- reading

def _unit(seed: int, *parts: str) -> float:
    """A uniform number in [0, 1) from a hash: stable across runs, machines and corpus changes."""
    h = hashlib.sha256(":".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def _read_source(entry: dict, limit: int | None, progress: bool) -> tuple[dict, list[dict]]:
    """Read one recipe entry. Returns (manifest info, raw records)."""
    name, mod = entry["name"], SOURCES[entry.get("reader", entry["name"])]
    path = entry.get("path")
    info = {"name": name, "license": entry.get("license", "unknown"), "weight": entry.get("weight", 1.0),
            "version": None, "path": path or mod.DEFAULT_PATH, "sha256": None, "status": "ok",
            "records": {}}
    if info["weight"] == 0:
        return {**info, "status": "skipped", "reason": "weight is 0"}, []
    reason = mod.missing(path)
    if reason:
        if mod is user_files:
            raise CorpusError(f"{name}: {reason}")
        tqdm.write(f"skipped {name}: {reason} (install: {mod.INSTALL_HINT})", file=sys.stderr)
        return {**info, "status": "skipped", "reason": reason}, []
    files = mod.input_files(path)
    base = path or mod.DEFAULT_PATH
    root = Path(base) if base and Path(base).is_dir() else None  # hash names relative to it
    info.update(version=mod.version(), sha256=sha256_files(files, root) if files else None)
    if info["path"] is None:
        info["path"] = str(files[0]) if files else "sys.stdlib_module_names"
    bar = tqdm(desc=f"read {name}", unit="rec", disable=not progress, leave=False, file=sys.stderr)
    try:
        records = []
        for r in islice(mod.records(path, limit), limit):
            records.append({**r, "source": name, "license": info["license"]})
            bar.update()
    except CorpusError:
        raise
    except (OSError, ValueError, KeyError, IndexError, RuntimeError) as e:  # corrupt or odd input files
        raise CorpusError(f"{name}: cannot read {info['path']}: {e}") from None
    finally:
        bar.close()
    if not files:  # harvested, not read from files (docstrings): hash what was harvested instead
        h = hashlib.sha256()
        for r in records:
            h.update(f"{r['id']}\0{r['text']}\0".encode())
        info["sha256"] = h.hexdigest()
    return info, records


# ----------------------------------------------------------------------------- writing

def _write_parquet(rows: list[dict], path: Path) -> dict:
    table = pa.Table.from_pylist([{c: r[c] for c in COLUMNS} for r in rows], schema=SCHEMA)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"file": path.name, "rows": len(rows), "sha256": digest}


def _split(records: list[dict], weights: dict[str, float], val_fraction: float,
           seed: int) -> tuple[list[dict], list[dict]]:
    val = [r for r in records if _unit(seed, "split", r["id"]) < val_fraction]
    if not val and val_fraction > 0 and len(records) > 1:  # tiny corpora still get a val set
        val = [min(records, key=lambda r: _unit(seed, "split", r["id"]))]
    val_ids = {r["id"] for r in val}
    train = []
    for r in records:
        if r["id"] in val_ids:
            continue
        w = weights[r["source"]]
        copies = int(w) + (_unit(seed, "weight", r["id"]) < w - int(w))
        train.extend([r] * copies)
    random.Random(seed).shuffle(train)
    return train, val


# ----------------------------------------------------------------------------- build

def build_corpus(recipe: str | Path, out_dir: str | Path, extra_paths=(), limit_per_source: int | None = None,
                 val_fraction: float = 0.01, seed: int = 0, progress: bool = True) -> dict:
    """Build the corpus described by `recipe` (+ user paths) into `out_dir`; return the manifest."""
    if not 0 <= val_fraction < 1:
        raise CorpusError(f"val fraction must be in [0, 1), got {val_fraction}")
    recipe_path, out = Path(recipe), Path(out_dir)
    spec = load_recipe(recipe_path)
    entries = [dict(e) for e in spec["sources"]]
    for e in entries:  # recipe paths are relative to the recipe file, so recipes travel
        if e.get("path") and not Path(e["path"]).is_absolute():
            e["path"] = str((recipe_path.parent / e["path"]).resolve())
    for p in extra_paths:
        if not Path(p).exists():
            raise CorpusError(f"--add {p}: no such file or directory")
        entries.append({"name": "user", "reader": "user", "path": str(p), "license": "user-supplied"})

    infos, records = [], []
    for k, e in enumerate(entries):
        info, recs = _read_source(e, limit_per_source, progress)
        for r in recs:
            r["_k"] = k  # which entry: several --add paths share the source name "user"
        infos.append(info)
        records.extend(recs)

    def count(step: str, recs: list[dict]) -> list[dict]:
        n = Counter(r["_k"] for r in recs)
        for k, info in enumerate(infos):
            if info["status"] == "ok":
                info["records"][step] = n.get(k, 0)
        return recs

    count("raw", records)
    records = count("after_clean", clean.clean_records(records))
    records = count("after_exact_dedup", dedup.exact_dedup(records))
    records = count("after_near_dedup", dedup.near_dedup(records, progress=progress))
    records, pii_counts = pii.scrub_records(records, progress=progress)
    count("after_pii", records)
    if not records:
        raise CorpusError("the corpus is empty: every source was skipped or had no usable text "
                          "(install the optional sources or pass --add PATH)")
    for k, info in enumerate(infos):
        info["text_mb"] = round(sum(len(r["text"].encode()) for r in records if r["_k"] == k) / 1e6, 3)

    seen: Counter = Counter()
    for r in records:  # ids must be unique; two --add folders can hold the same relative path
        seen[r["id"]] += 1
        if seen[r["id"]] > 1:
            r["id"] = f"{r['id']}~{seen[r['id']]}"
    weights = {e["name"]: float(e.get("weight", 1.0)) for e in entries}
    train, val = _split(records, weights, val_fraction, seed)
    if not train:
        raise CorpusError("the train split is empty (lower --val-fraction or add more text)")

    out.mkdir(parents=True, exist_ok=True)
    outputs = [_write_parquet(train[i:i + ROWS_PER_SHARD], out / f"train-{i // ROWS_PER_SHARD:05d}.parquet")
               for i in range(0, len(train), ROWS_PER_SHARD)]
    outputs.append(_write_parquet(val, out / "val-00000.parquet"))
    written = {o["file"] for o in outputs}
    for stale in [*out.glob("train-*.parquet"), *out.glob("val-*.parquet")]:
        if stale.name not in written:
            stale.unlink()

    manifest = {
        "recipe": str(recipe_path),
        "recipe_sha256": hashlib.sha256(recipe_path.read_bytes()).hexdigest(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {"limit_per_source": limit_per_source, "val_fraction": val_fraction, "seed": seed,
                     "extra_paths": [str(p) for p in extra_paths], "rows_per_shard": ROWS_PER_SHARD,
                     "near_dedup": {"threshold": dedup.THRESHOLD, "num_perm": dedup.NUM_PERM,
                                    "shingle_words": dedup.SHINGLE, "min_words": dedup.MIN_WORDS}},
        "sources": infos,
        "pii_replacements": pii_counts,
        "outputs": outputs,
        "totals": {"records": len(records), "train_rows": len(train), "val_rows": len(val),
                   "text_mb": round(sum(len(r["text"].encode()) for r in records) / 1e6, 3),
                   "sources_ok": sum(i["status"] == "ok" for i in infos),
                   "sources_skipped": sum(i["status"] == "skipped" for i in infos)},
    }
    atomic_write_bytes(out / "manifest.json", (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode())
    return manifest


# ----------------------------------------------------------------------------- reading back

def _shards(out_dir: str | Path, split: str) -> list[Path]:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return sorted(Path(out_dir).glob(f"{split}-*.parquet"))


def iter_records(out_dir: str | Path, split: str) -> Iterator[dict]:
    """All columns of OUT/{split}-*.parquet, shard by shard, row by row (deterministic order)."""
    for f in _shards(out_dir, split):
        for batch in pq.ParquetFile(f).iter_batches(batch_size=4096):
            yield from batch.to_pylist()


def iter_texts(out_dir: str | Path, split: str) -> Iterator[str]:
    """The `text` column of OUT/{split}-*.parquet in the same order as iter_records."""
    for f in _shards(out_dir, split):
        for batch in pq.ParquetFile(f).iter_batches(batch_size=4096, columns=["text"]):
            yield from batch.column(0).to_pylist()


# ----------------------------------------------------------------------------- comparing builds

def _identity(manifest: dict) -> dict[str, object]:
    """What makes two corpus builds the same corpus, flattened to 'field: value'; not when or where
    they were built (created, absolute paths)."""
    flat: dict[str, object] = {"recipe_sha256": manifest.get("recipe_sha256"),
                               "settings": json.dumps(manifest.get("settings"), sort_keys=True),
                               "pii_replacements": json.dumps(manifest.get("pii_replacements"), sort_keys=True)}
    for s in manifest.get("sources", []):
        for key in ("status", "version", "sha256", "license", "weight"):
            flat[f"{s.get('name')}.{key}"] = s.get(key)
        for step, n in (s.get("records") or {}).items():
            flat[f"{s.get('name')}.records.{step}"] = n
    for o in manifest.get("outputs", []):
        flat[f"{o.get('file')}.rows"], flat[f"{o.get('file')}.sha256"] = o.get("rows"), o.get("sha256")
    for key, value in (manifest.get("totals") or {}).items():
        flat[f"totals.{key}"] = value
    return flat


def manifest_differences(expected: dict, built: dict) -> list[str]:
    """Lines 'field: expected -> built' for every way `built` is not the corpus `expected` describes."""
    a, b = _identity(expected), _identity(built)
    return [f"{k}: {a.get(k, 'absent')} -> {b.get(k, 'absent')}" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)]
