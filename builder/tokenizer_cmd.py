"""`builder tokenizer ...`: train the SentencePiece BPE tokenizer, inspect how it encodes text."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import click

from source.tokenizer import Tokenizer, train_tokenizer

VAL_CHARS = 2_000_000  # enough text for a stable chars/token figure, quick to encode


def _split_texts(data_dir: Path, split: str) -> Iterator[str]:
    from source.corpus.build import iter_texts  # the corpus module owns the shard format

    return iter(iter_texts(data_dir, split))


def _has_split(data_dir: Path, split: str) -> bool:
    return any(data_dir.glob(f"{split}-*.parquet"))


def _chars_per_token(tok: Tokenizer, texts: Iterator[str]) -> float | None:
    chars = tokens = 0
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        chars += len(t)
        if len(batch) == 256 or chars >= VAL_CHARS:
            tokens += sum(map(len, tok.encode_batch(batch)))
            batch = []
        if chars >= VAL_CHARS:
            break
    tokens += sum(map(len, tok.encode_batch(batch)))
    return chars / tokens if tokens else None


@click.group()
def tokenizer() -> None:
    """Train the tokenizer (SentencePiece BPE + tokenizer.json) and look at its output."""


@tokenizer.command()
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=Path("datasets/built/default"),
              show_default=True, help="Built corpus folder (train-*.parquet shards from `builder data build`).")
@click.option("--text-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Train on a plain text file instead of --data (one document; blank lines separate paragraphs).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("runs/tokenizer"),
              show_default=True, help="Folder to write tokenizer.model, tokenizer.json and the HF configs to.")
@click.option("--vocab-size", type=click.IntRange(min=300, max=65536), default=8192, show_default=True,
              help="Exact number of pieces; the model's vocab_size must match it.")
@click.option("--max-chars", type=click.IntRange(min=1), default=30_000_000, show_default=True,
              help="Train on a seeded random sample of at most this many characters (bounds time and memory).")
@click.option("--seed", type=int, default=0, show_default=True)
def train(data_dir: Path, text_file: Path | None, out_dir: Path, vocab_size: int, max_chars: int, seed: int) -> None:
    """Train a SentencePiece BPE tokenizer with the chat tokens and export it for transformers(.js).

    \b
    Examples:
      builder tokenizer train
      builder tokenizer train --vocab-size 4096 --out runs/tok4k
      builder tokenizer train --text-file notes.txt --vocab-size 1000
    """
    if text_file is not None:
        if not text_file.is_file():
            raise click.ClickException(f"text file {text_file} does not exist")
        texts: Iterator[str] = iter([text_file.read_text(encoding="utf-8", errors="replace")])
        source_desc = str(text_file)
    else:
        if not data_dir.is_dir() or not _has_split(data_dir, "train"):
            raise click.ClickException(
                f"no training data in {data_dir} (expected train-*.parquet): run `builder data build` "
                f"first, or pass --text-file PATH")
        texts = _split_texts(data_dir, "train")
        source_desc = f"{data_dir} (train split)"

    click.echo(f"training a {vocab_size}-piece BPE tokenizer on {source_desc}, at most {max_chars:,} chars ...")
    t0 = time.perf_counter()
    try:
        out = train_tokenizer(texts, out_dir, vocab_size=vocab_size, max_chars=max_chars, seed=seed)
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    seconds = time.perf_counter() - t0

    tok = Tokenizer.load(out)
    click.echo(f"vocab size:   {tok.vocab_size}")
    click.echo(f"time:         {seconds:.1f} s")
    if text_file is None and _has_split(data_dir, "val"):
        cpt = _chars_per_token(tok, _split_texts(data_dir, "val"))
        if cpt is not None:
            click.echo(f"val chars/token: {cpt:.2f}")
    click.echo(f"sha256:       {tok.sha256}")
    click.echo("files:")
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        f = out / name
        click.echo(f"  {f}  ({f.stat().st_size:,} bytes)")


@tokenizer.command()
@click.argument("text")
@click.option("--dir", "tok_dir", type=click.Path(path_type=Path), default=Path("runs/tokenizer"), show_default=True,
              help="Tokenizer folder written by `builder tokenizer train`.")
def encode(text: str, tok_dir: Path) -> None:
    """Print the ids and pieces of TEXT (no BOS), to see how the tokenizer splits it.

    \b
    Example:
      builder tokenizer encode "def f(x):  return 12345" --dir runs/tokenizer
    """
    try:
        tok = Tokenizer.load(tok_dir)
    except FileNotFoundError as err:
        raise click.ClickException(str(err)) from err
    ids = tok.encode(text)
    click.echo(f"{len(ids)} tokens, {len(text)} chars")
    click.echo("ids:    " + " ".join(map(str, ids)))
    click.echo("pieces: " + " ".join(repr(tok.id_to_piece(i)) for i in ids))
