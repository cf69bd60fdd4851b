"""Token shards for pretraining, and the batch sampler that reads them.

The corpus' Parquet shards are tokenized once per (corpus, tokenizer) pair into flat binary files
(`train.bin`, `val.bin`: uint16 when the vocabulary fits, else uint32; every document is
`<s> text </s>`), plus `meta.json` with token and byte counts (for bits-per-byte) and the hashes of
what they were made from. They are memory-mapped, so a 100 MB shard costs no RAM.

Batches are drawn by position: the window offsets of micro-batch `m` at step `s` on rank `r` come
from a generator seeded with (seed, s, m, r). Resuming at step `s` therefore needs no data-loader
state and reproduces the uninterrupted run exactly, on any number of processes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from source.files import atomic_write_bytes, sha256_file


def _batched(texts: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_split(texts: Iterable[str], tokenizer, out_path: Path, progress: bool = True) -> dict:
    """Write one split as a flat token file; returns counts."""
    from tqdm import tqdm

    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    tmp = out_path.with_suffix(".bin.tmp")
    n_tokens = n_bytes = n_docs = 0
    with open(tmp, "wb") as f, tqdm(desc=f"tokenize {out_path.stem}", unit=" docs", disable=not progress) as bar:
        for batch in _batched(texts, 512):
            for text, ids in zip(batch, tokenizer.encode_batch(batch)):
                bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]  # Qwen's tokenizers have no BOS
                arr = np.asarray([*bos, *ids, tokenizer.eos_id], dtype=dtype)
                f.write(arr.tobytes())
                n_tokens += arr.size
                n_bytes += len(text.encode("utf-8"))
                n_docs += 1
            bar.update(len(batch))
    tmp.replace(out_path)
    return {"tokens": n_tokens, "bytes": n_bytes, "documents": n_docs}


def default_token_dir(data_dir: str | Path, tokenizer, runs: str | Path = "runs") -> Path:
    """Where the shards of one (corpus, tokenizer) pair live: one folder per tokenizer hash."""
    return Path(runs) / "tokens" / f"{Path(data_dir).name}-{tokenizer.sha256[:12]}"


def build_token_shards(data_dir: str | Path, tokenizer, out_dir: str | Path, progress: bool = True) -> dict:
    """Tokenize `data_dir`'s train/val Parquet shards into `out_dir` unless already up to date."""
    from source.corpus.build import iter_texts

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    manifest = data_dir / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: no corpus manifest; run `builder data build` first")
    source_sha = sha256_file(manifest)
    meta_path = out_dir / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("corpus_manifest_sha256") == source_sha and meta.get("tokenizer_sha256") == tokenizer.sha256:
            return meta
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    meta = {"corpus": str(data_dir), "corpus_manifest_sha256": source_sha, "tokenizer_sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size, "dtype": "uint16" if tokenizer.vocab_size <= 65536 else "uint32"}
    for split in ("train", "val"):
        meta[split] = tokenize_split(iter_texts(data_dir, split), tokenizer, out_dir / f"{split}.bin", progress)
        if meta[split]["tokens"] == 0:
            raise ValueError(f"{data_dir}: the {split} split is empty; rebuild the corpus with more data")
    meta["seconds"] = round(time.time() - t0, 2)
    atomic_write_bytes(meta_path, json.dumps(meta, indent=2).encode())
    return meta


class TokenShards:
    """Random windows over the memory-mapped token files."""

    def __init__(self, token_dir: str | Path, seed: int = 0):
        token_dir = Path(token_dir)
        meta_path = token_dir / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: no token shards here")
        self.meta = json.loads(meta_path.read_text())
        self.seed = seed
        dtype = np.dtype(self.meta["dtype"])
        self.splits = {s: np.memmap(token_dir / f"{s}.bin", dtype=dtype, mode="r") for s in ("train", "val")}

    @property
    def tokens_per_byte(self) -> float:
        """Of the val split; turns nats/token into bits/byte."""
        return self.meta["val"]["tokens"] / max(1, self.meta["val"]["bytes"])

    def batch(self, split: str, batch_size: int, seq_len: int, step: int, micro: int = 0,
              rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.splits[split]
        if len(data) <= seq_len + 1:
            raise ValueError(f"the {split} split has {len(data)} tokens, fewer than seq_len+1={seq_len + 1}")
        salt = 0 if split == "train" else 1
        gen = np.random.default_rng([self.seed, salt, step, micro, rank])
        starts = gen.integers(0, len(data) - seq_len - 1, size=batch_size)
        window = np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int64)
        window = torch.from_numpy(window)
        return window[:, :-1], window[:, 1:]
