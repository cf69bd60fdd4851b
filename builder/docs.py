"""The documentation site: docs/mkdocs.yml + docs/pages/, plus the champion's model card, built strictly.

Design choices:
- The build works on a copy of docs/ in a temporary folder, so the generated card never lands in the
  repository's pages; the committed pages/model-card.md is only the stand-in for a bare `mkdocs build`.
- mkdocs runs as a subprocess (`python -m mkdocs build --strict`): its plugins (mkdocs-click imports both
  CLIs) and its logging stay out of this process, and its own message is what the user sees on failure.
- The site is built next to --out and renamed into place, so a failed build leaves the old site intact.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from source.files import replace_dir

DOCS = Path(__file__).resolve().parents[1] / "docs"


def build_docs(out: Path, card: Path | None = None, root: Path = Path("models"), docs: Path = DOCS) -> Path:
    """Build the site into `out`; the model card page is `card` (copied, with its loss_curve.png) or the
    champion's card of the registry at `root`, rendered now."""
    from builder.card import LOSS_PNG, write_card
    from source.registry import Registry

    if not (docs / "mkdocs.yml").is_file():
        raise click.ClickException(f"{docs / 'mkdocs.yml'} not found: the docs sources are missing")
    with tempfile.TemporaryDirectory(prefix="supermix-docs-") as tmp:
        stage = Path(tmp) / "docs"
        shutil.copytree(docs, stage, ignore=shutil.ignore_patterns("site"))
        page = stage / "pages" / "model-card.md"
        if card is not None:
            if not card.is_file():
                raise click.ClickException(f"model card {card} not found")
            shutil.copyfile(card, page)
            if (card.parent / LOSS_PNG).is_file():
                shutil.copyfile(card.parent / LOSS_PNG, page.parent / LOSS_PNG)
        else:
            write_card(Registry(root), "champion", page)
        out = out.resolve()
        partial = out.with_name(f".{out.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's end-of-life banner
        proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f",
                               str(stage / "mkdocs.yml"), "-d", str(partial)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and "│" not in ln]
            raise click.ClickException("mkdocs build --strict failed (docs/mkdocs.yml):\n" + "\n".join(lines[-20:]))
        replace_dir(partial, out)
    return out
