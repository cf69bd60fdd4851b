"""`builder card`: the model card of a registry version, thin over builder/card.py."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--model", "ref", default="champion", show_default=True, help="Registry version: vN, champion or latest.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=Path("models"), show_default=True,
              help="Registry folder (registry.json + versions/).")
@click.option("--export", "export_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder written by `builder export`: its manifest.json gives ONNX speeds, file sizes and gates.")
@click.option("--dataset-manifest", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("datasets/manifests/default.json"), show_default=True,
              help="Dataset manifest with the training sources and their licences.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The card to write (README.md); the loss curve goes next to it as loss_curve.png.")
def card(ref: str, root: Path, export_dir: Path | None, dataset_manifest: Path, out: Path) -> None:
    """Write a Hugging Face style model card (README.md with YAML front matter) for a registry version.

    Every field comes from this version's files: the registry entry, eval.json, the tokenizer, the dataset
    manifest, the training logs kept in the version folder, and the export's manifest.json. Without
    --export the card measures PyTorch decode speed itself (a few seconds).

    \b
    Examples:
      builder card --out dist/card/README.md
      builder card --model v2 --export dist/export --out dist/export/README.md
    """
    from builder.card import write_card
    from source.registry import Registry

    path, png = write_card(Registry(root), ref, out, export_dir, dataset_manifest)
    click.echo(f"wrote {path}" + (f" and {png}" if png else " (no training log kept with this version: no loss curve)"))
