"""Deduplication: exact (sha256 of normalised text), then near (MinHash LSH from datasketch).

Design choices:
- Both passes keep the *first* occurrence in recipe order, so the recipe decides which source
  "owns" shared text, and the result is deterministic.
- Exact: key = sha256 of the case-folded text with whitespace runs collapsed, so records that
  differ only in case or spacing count as one.
- Near: Jaccard similarity of word 5-shingles, estimated with 128-permutation MinHash and found
  with LSH at threshold 0.8; a candidate from LSH is confirmed with the MinHash estimate before a
  record is dropped (LSH alone has false positives).
- Only records of at least MIN_WORDS words enter the near pass: a WordNet gloss of eight words
  has four shingles, and two different words whose glosses share three of them are not duplicates.
- Shingles are hashed with zlib.crc32 (C speed, deterministic) instead of datasketch's default
  SHA-1, which makes the pass several times faster; MinHash mixes and permutes the hash afterwards anyway.
"""

from __future__ import annotations

import hashlib
import re
import zlib

from datasketch import MinHash, MinHashLSH
from tqdm import tqdm

THRESHOLD = 0.8
NUM_PERM = 128
SHINGLE = 5
MIN_WORDS = 40
WORD = re.compile(r"\w+")


def text_key(text: str) -> str:
    return hashlib.sha256(" ".join(text.casefold().split()).encode("utf-8")).hexdigest()


def exact_dedup(records: list[dict]) -> list[dict]:
    seen: set[str] = set()
    kept = []
    for r in records:
        key = text_key(r["text"])
        if key not in seen:
            seen.add(key)
            kept.append(r)
    return kept


def shingles(text: str, k: int = SHINGLE) -> set[bytes]:
    words = WORD.findall(text.casefold())
    return {" ".join(words[i:i + k]).encode("utf-8") for i in range(len(words) - k + 1)}


def near_dedup(records: list[dict], threshold: float = THRESHOLD, num_perm: int = NUM_PERM,
               min_words: int = MIN_WORDS, progress: bool = False) -> list[dict]:
    """Drop records whose shingle set is ~`threshold`-similar to an earlier record's."""
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    # One template, copied per record: copies share its permutations (what MinHash.generator does).
    template = MinHash(num_perm=num_perm, hashfunc=zlib.crc32)
    sketches: dict[int, MinHash] = {}
    drop: set[int] = set()
    for i, r in enumerate(tqdm(records, desc="near-dedup", unit="rec", disable=not progress, leave=False)):
        sh = shingles(r["text"])
        if len(sh) < min_words - SHINGLE + 1:
            continue
        m = template.copy()
        m.update_batch(sh)
        if any(sketches[j].jaccard(m) >= threshold for j in lsh.query(m)):
            drop.add(i)
            continue
        lsh.insert(i, m)
        sketches[i] = m
    return [r for i, r in enumerate(records) if i not in drop]
