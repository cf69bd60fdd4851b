"""`builder index ...`: the retrieval stage, thin over `source.retrieval`."""

from __future__ import annotations

import time
from pathlib import Path

import click

DEFAULT_DATA = Path("datasets/built/default")
DEFAULT_INDEX = Path("datasets/built/index")


@click.group()
def index() -> None:
    """Build and query the retrieval index (BM25, static files the site serves too) that grounds answers."""


@index.command()
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_DATA,
              show_default=True, help="Built corpus folder (train-*.parquet, val-*.parquet, manifest.json).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_INDEX,
              show_default=True, help="The index folder to write (swapped in whole when complete).")
@click.option("--sources", default=None, metavar="A,B",
              help="Comma-separated sources to index [default: all but chitchat].")
@click.option("--max-chars", type=click.IntRange(min=50), default=600, show_default=True,
              help="Longest passage, in characters; records are cut at paragraph/sentence breaks.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def build(data_dir: Path, out: Path, sources: str | None, max_chars: int, quiet: bool) -> None:
    """Cut the built corpus into passages and index them for BM25 search.

    \b
    Examples:
      builder index build                                  # datasets/built/default -> datasets/built/index/
      builder index build --sources docstrings,python-docs --out /tmp/py-index
      builder index build --max-chars 400
    """
    from source.retrieval_build import build_index  # imported here so `builder --help` stays fast

    wanted = tuple(s.strip() for s in sources.split(",") if s.strip()) if sources is not None else None
    if wanted == ():
        raise click.ClickException("--sources is empty: give source names such as docstrings,wordnet")
    try:
        stats = build_index(data_dir, out, sources=wanted, max_chars=max_chars, progress=not quiet)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot write {out}: {e}") from None
    rows = [("source", "passages"), *((s, str(n)) for s, n in stats["counts"].items()),
            ("total", str(stats["passages"]))]
    width = max(len(r[0]) for r in rows)
    lines = [f"{a.ljust(width)}  {b.rjust(8)}" for a, b in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(-1, "-" * len(lines[0]))
    click.echo("\n".join(lines))
    if wanted:
        if missing := [s for s in wanted if s not in stats["counts"]]:
            click.echo(f"note: no records from {', '.join(missing)} in {data_dir}", err=True)
    click.echo(f"{stats['records']} records -> {stats['passages']} passages (max {max_chars} chars); "
               f"wrote {out}/ ({stats['bytes']['total'] / 1e6:.1f} MB) in {stats['seconds']:.1f}s")


@index.command()
@click.argument("query")
@click.option("--index", "index_path", type=click.Path(path_type=Path), default=DEFAULT_INDEX,
              show_default=True, help="The index built by `builder index build`.")
@click.option("-k", type=click.IntRange(min=1), default=3, show_default=True, help="How many passages.")
@click.option("--sources", default=None, metavar="A,B", help="Only these comma-separated sources.")
@click.option("--full", is_flag=True, help="Print whole passages, not snippets.")
def search(query: str, index_path: Path, k: int, sources: str | None, full: bool) -> None:
    """Print the passages that retrieval would hand the model for QUERY (for debugging).

    \b
    Examples:
      builder index search "What does json.dumps do?"
      builder index search "define ephemeral" -k 5
      builder index search "closure" --sources foldoc,wordnet --full
    """
    from source.retrieval import Index

    try:
        ix = Index(index_path)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    wanted = tuple(s.strip() for s in sources.split(",") if s.strip()) if sources is not None else None
    t0 = time.perf_counter()
    hits = ix.search(query, k=k, sources=wanted)
    ms = (time.perf_counter() - t0) * 1000
    if not hits:
        click.echo(f"no passages match {query!r} ({ms:.1f} ms)")
        return
    for i, p in enumerate(hits, 1):
        click.echo(click.style(f"[{i}] {p.id}", bold=True) + f"  {p.title!r}  ({p.source}, score {p.score:.2f})")
        body = p.text if full else " ".join(p.text.split())
        click.echo(body if full or len(body) <= 240 else body[:240].rsplit(" ", 1)[0] + " ...")
        click.echo()
    click.echo(f"{len(hits)} of {len(ix)} passages in {ms:.1f} ms")
