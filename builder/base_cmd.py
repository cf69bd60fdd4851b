"""`builder base ...`: bring your own base, a local Hugging Face model folder; thin over `source.hf_base`."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import click

from source.registry import Registry, RegistryError


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Folder and registry problems are the user's to fix: a one-line message, no traceback."""
    try:
        yield
    except (ValueError, OSError) as exc:  # BaseError, RegistryError and TokenizerError are ValueErrors
        raise click.ClickException(str(exc)) from None


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _summary(entry: dict) -> str:
    a = entry["architecture"]
    return (f"{a['model_type']}, {_params(a['params'])} parameters: {a['layers']} layers, hidden {a['hidden']}, "
            f"{a['heads']} heads ({a['kv_heads']} kv, head_dim {a['head_dim']}), vocab {a['vocab']}, "
            f"{'tied' if a['tied_embeddings'] else 'untied'} head, context {a['max_positions']}")


@click.group()
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=Path("models"), show_default=True,
              help="Registry folder (registry.json).")
@click.pass_context
def base(ctx: click.Context, root: Path) -> None:
    """Pretrained Hugging Face models to build on: checked, hashed and recorded in the registry.

    A base stays where it is: the registry keeps its path and the sha256 of every file it is built from.

    \b
    Examples:
      builder base import ~/models/SmolLM2-135M-Instruct
      builder base import ./my-llama --name tiny-llama
      builder base list
      builder base info tiny-llama          # re-hashes its files
      supermix chat --model ~/models/SmolLM2-135M-Instruct
    """
    ctx.obj = Registry(root)


@base.command("import")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", default=None, help="Name in the registry [default: the folder's name].")
@click.pass_context
def import_(ctx: click.Context, path: Path, name: str | None) -> None:
    """Check the Hugging Face folder PATH (config.json, safetensors, tokenizer.json, chat template) and record it.

    Supported: model_type llama and qwen2. Tensor names and shapes are checked against config.json from the
    safetensors headers, without loading the weights. On any problem nothing is written.
    """
    from source.hf_base import import_base

    with _user_errors():
        entry = import_base(path, ctx.obj, name).to_dict()
    click.echo(f"imported base {entry['name']} from {entry['source']}")
    click.echo(f"  {_summary(entry)}")
    click.echo(f"  licence: {entry['licence']['name']}" + ("" if entry["licence"]["file"] else
                                                           " (no LICENSE file: check the terms before shipping it)"))
    template = entry["tokenizer"]["chat_template"]
    click.echo(f"  chat template: {template}" if template else
               "  chat template: none (supermix cannot chat with it until it has one)")
    click.echo(f"  {len(entry['files'])} files hashed; chat with it: supermix chat --model {entry['source']}")


@base.command("list")
@click.pass_context
def list_(ctx: click.Context) -> None:
    """The imported bases."""
    reg: Registry = ctx.obj
    with _user_errors():
        bases = reg.load()["bases"]
    if not bases:
        click.echo(f"no bases in {reg.path}; import one with `builder base import PATH`")
    for name, entry in bases.items():
        click.echo(f"{name}  {_summary(entry)}\n  {entry['source']}")


@base.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the registry entry and the file check as JSON.")
@click.pass_context
def info(ctx: click.Context, name: str, as_json: bool) -> None:
    """One base, with a re-hash of its files (exit status 1 if any is missing or changed)."""
    from source.hf_base import get_base, verify_base

    with _user_errors():
        entry = get_base(ctx.obj, name)
        report = verify_base(entry)
    if as_json:
        click.echo(json.dumps({**entry, "verify": report}, indent=2))
    else:
        click.echo(f"{name}  {_summary(entry)}\n  source: {entry['source']}\n  imported: {entry['imported']}\n"
                   f"  licence: {entry['licence']['name']}\n  files:")
        for path, status in report.items():
            click.echo(f"    {path}: {status}")
    if bad := [p for p, status in report.items() if status != "ok"]:
        raise click.ClickException(f"{len(bad)} file(s) of base {name} differ from the registry: {', '.join(bad)}")


@base.command()
@click.argument("name")
@click.pass_context
def remove(ctx: click.Context, name: str) -> None:
    """Forget base NAME (its folder is left as it is)."""
    from source.hf_base import remove_base

    with _user_errors():
        entry = remove_base(ctx.obj, name)
    click.echo(f"removed base {name} (its files stay in {entry['source']})")
