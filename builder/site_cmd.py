"""`builder site`: assemble the GitHub Pages folder, thin over `builder.site`."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--export", "export_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="A folder written by `builder export` (ONNX, tokenizer, manifest.json, index/).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The site folder to write (replaced as a whole).")
@click.option("--card", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The model card (Markdown, from `builder card`) shown on model.html.")
def site(export_dir: Path, out: Path, card: Path | None) -> None:
    """Build the static chat site: the model runs in the visitor's browser (transformers.js, wasm).

    \b
    Needs web_static/node_modules once: (cd web_static && npm ci --ignore-scripts)
    Examples:
      builder site --export dist/export --out dist/site --card dist/export/README.md
      python -m http.server -d dist/site 8000      # then open http://127.0.0.1:8000/
    """
    from builder.site import SiteError, build_site

    try:
        stats = build_site(export_dir, out, card=card)
    except SiteError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot write {out}: {e}") from None
    b = stats["bytes"]
    click.echo(f"wrote {stats['out']}: {stats['files']} files, {b['total'] / 1e6:.1f} MB "
               f"(model {b['model'] / 1e6:.1f}, index {b['index'] / 1e6:.1f}, vendor {b['vendor'] / 1e6:.1f}, "
               f"app {b['app'] / 1e3:.0f} KB)" + ("" if stats["retrieval"] else "; no index/ in the export: retrieval off"))
