"""`builder data ...`: the corpus stage, thin over `source.corpus.build`."""

from __future__ import annotations

import time
from pathlib import Path

import click

from source.corpus import CorpusError


@click.group()
def data() -> None:
    """Build the training corpus from installed sources and your own files."""


@data.command()
@click.option("--recipe", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("datasets/recipes/default.json"), show_default=True,
              help="JSON recipe: which sources, their mix weights and licences.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("datasets/built/default"), show_default=True,
              help="Output folder for train-*.parquet, val-00000.parquet and manifest.json.")
@click.option("--add", "extra", multiple=True, type=click.Path(path_type=Path),
              help="Extra file or folder (.txt .md .rst .jsonl .parquet); repeatable.")
@click.option("--limit-per-source", type=click.IntRange(min=1), default=None,
              help="Read at most N records per source (quick runs and tests).")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.01, show_default=True,
              help="Share of records held out for validation.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the split and the shuffle.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def build(recipe: Path, out_dir: Path, extra: tuple[Path, ...], limit_per_source: int | None,
          val_fraction: float, seed: int, quiet: bool) -> None:
    """Read, clean, deduplicate and PII-scrub the corpus into Parquet shards + a manifest.

    \b
    Examples:
      builder data build                                 # the default recipe, ~42 MB of text
      builder data build --add notes/ --add chats.jsonl  # plus your own files
      builder data build --limit-per-source 200 --out /tmp/mini   # a quick smoke run

    Missing optional sources (python3-doc, wordnet-base, dict-foldoc, chitchat-dataset) are
    skipped with a note saying how to install them. See datasets/README.md for the recipe
    format and what the manifest records.
    """
    from source.corpus.build import build_corpus  # imported here so `builder --help` stays fast

    if not recipe.is_file():
        raise click.ClickException(f"recipe {recipe} not found: run from the repository root or pass --recipe")
    t0 = time.time()
    try:
        manifest = build_corpus(recipe, out_dir, extra_paths=extra, limit_per_source=limit_per_source,
                                val_fraction=val_fraction, seed=seed, progress=not quiet)
    except CorpusError as e:
        raise click.ClickException(str(e)) from None
    click.echo(summary(manifest))
    click.echo(f"wrote {out_dir} in {time.time() - t0:.1f}s")


def summary(manifest: dict) -> str:
    """A small table: records per source through each step, and megabytes kept."""
    rows = [("source", "status", "raw", "clean", "exact", "near", "final", "MB")]
    for s in manifest["sources"]:
        n = s.get("records", {})
        rows.append((s["name"], s["status"], *(str(n.get(k, "-")) for k in
                     ("raw", "after_clean", "after_exact_dedup", "after_near_dedup", "after_pii")),
                     f"{s.get('text_mb', 0):.2f}"))
    t = manifest["totals"]
    rows.append(("total", "", "", "", "", "", str(t["records"]), f"{t['text_mb']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    pii = ", ".join(f"{k} {v}" for k, v in manifest["pii_replacements"].items() if v) or "none"
    lines.append(f"train rows {t['train_rows']}, val rows {t['val_rows']}; PII replaced: {pii}")
    return "\n".join(lines)
