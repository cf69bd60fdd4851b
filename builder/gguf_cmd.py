"""`builder gguf`: a registry version -> GGUF files (f32, f16, q8_0) + an Ollama Modelfile, for llama.cpp and Ollama."""

from __future__ import annotations

from pathlib import Path

import click

from builder.gguf import DEFAULT_DTYPES, DTYPES


@click.command("gguf")
@click.option("--model", "model_spec", default="champion", show_default=True,
              help="Registry version (v3, champion, latest) or a model.pth path.")
@click.option("--tokenizer", "tokenizer_dir", default=None, type=click.Path(path_type=Path),
              help="Tokenizer folder [default: the version's own, else runs/tokenizer].")
@click.option("--out", "out_dir", default=Path("dist/gguf"), show_default=True, type=click.Path(path_type=Path),
              help="Output folder (replaced as a whole once every file is written).")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(DTYPES),
              help=f"Weights to write; repeat for several [default: {', '.join(DEFAULT_DTYPES)}].")
@click.option("--root", default=Path("models"), show_default=True, type=click.Path(path_type=Path),
              help="Registry folder.")
def gguf(model_spec: str, tokenizer_dir: Path | None, out_dir: Path, dtypes: tuple[str, ...], root: Path) -> None:
    """Write GGUF files for llama.cpp, llama-cpp-python and Ollama (seconds; no ONNX, no gates).

    \b
    Writes:
      model-f32.gguf   exact (greedy tokens equal ours in llama.cpp)
      model-f16.gguf   half the size
      model-q8_0.gguf  a quarter of the size (llama.cpp's 8-bit blocks)
      Modelfile        for `ollama create supermix -f Modelfile` (FROM ./model-f32.gguf)
    Each file holds the hyper-parameters, the vocabulary (ours, or an imported base's byte-level BPE) and
    the chat template (ours, or the base's own).
    `builder export --gguf` writes the same files into the export folder's gguf/.

    \b
    Examples:
      builder gguf                              # the champion -> dist/gguf
      builder gguf --model v9 --dtype q8_0 --out /tmp/v9-gguf
      cd dist/gguf && ollama create supermix -f Modelfile && ollama run supermix
    """
    from builder.gguf import export_gguf
    from builder.eval_cmd import registry_version
    from runtime_python.backends import resolve_model

    try:
        pth, tok_dir = resolve_model(model_spec, root, tokenizer_dir)
        version = registry_version(pth, root)
        files = export_gguf(pth, tok_dir, out_dir, dtypes or DEFAULT_DTYPES,
                            name=f"supermix-{version}" if version else "supermix", log=click.echo)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    for f in files:
        click.echo(f"  {f} ({f.stat().st_size / 1e6:.1f} MB)")
