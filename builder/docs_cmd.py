"""`builder docs`: the mkdocs-material documentation site, thin over builder/docs.py."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("dist/docs"), show_default=True,
              help="Folder for the built site (replaced when the build succeeds).")
@click.option("--card", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A model card already rendered by `builder card` [default: render the champion's now].")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=Path("models"), show_default=True,
              help="Registry folder whose champion the card describes.")
def docs(out: Path, card: Path | None, root: Path) -> None:
    """Build the documentation (docs/mkdocs.yml, pages in docs/pages/) with `mkdocs build --strict`.

    The build gets the champion's model card and a CLI reference generated from the Click commands.
    It needs no network: fonts are the system's, and no script comes from a CDN.

    \b
    Examples:
      builder docs
      builder docs --card dist/export/README.md --out dist/pages/docs
      python -m http.server -d dist/docs 8001
    """
    from builder.docs import build_docs

    click.echo(f"wrote the docs site to {build_docs(out, card, root)}")
