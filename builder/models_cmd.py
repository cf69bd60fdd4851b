"""`builder models ...`: the model registry (models/registry.json), thin over `source.registry`."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import click

from source.registry import CHAMPION_RULE, Registry, RegistryError


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Registry and file problems are the user's to fix: a one-line message, no traceback."""
    try:
        yield
    except (RegistryError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


def _registry(ctx: click.Context) -> Registry:
    return ctx.find_object(Registry)


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _metric(x: Any) -> str:
    return "-" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)


def _json_object(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"{what} file {path}: {exc}") from None
    if not isinstance(obj, dict):
        raise click.ClickException(f"{what} file {path}: expected a JSON object like {{\"val_bpb\": 1.23}}")
    return obj


@click.group()
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=Path("models"), show_default=True,
              help="Registry folder (registry.json + versions/).")
@click.pass_context
def models(ctx: click.Context, root: Path) -> None:
    """The model registry: numbered versions with lineage, metrics, file hashes and a champion.

    \b
    Examples:
      builder models add runs/pretrain-small/model.pth --tokenizer runs/tokenizer
      builder models add runs/sft/model.pth --tokenizer runs/tokenizer --parent v1 --notes "chat SFT"
      builder models list
      builder models champion --auto      # pick by the rule: grounded_qa, then val_bpb
      builder models --root /tmp/models list

    See models/README.md for the layout.
    """
    ctx.obj = Registry(root)


@models.command("list")
@click.pass_context
def list_(ctx: click.Context) -> None:
    """Table of all versions; `*` marks the champion.

    \b
    Example:
      builder models list
    """
    reg = _registry(ctx)
    with _user_errors():
        state, strays = reg.load(), reg.strays()
    if not state["versions"]:
        click.echo(f"no versions in {reg.path} yet; add one with "
                   f"`builder models add RUN/model.pth --tokenizer runs/tokenizer`")
    else:
        head = ("", "id", "kind", "created (UTC)", "parent", "params", "val_bpb", "grounded_qa")
        rows = [("*" if v.id == state["champion"] else "", v.id, v.kind, v.created.replace("T", " ")[:16],
                 v.parent or "-", _params(v.params), _metric(v.metrics.get("val_bpb")),
                 _metric(v.metrics.get("grounded_qa"))) for v in state["versions"]]
        widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
        for r in (head, *rows):
            click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        champion = state["champion"]
        click.echo(f"\n* champion: {champion} ({state['champion_reason']})" if champion else
                   "\nno champion yet: `builder models promote vN` or `builder models champion --auto`")
    for p in strays:
        click.echo(f"note: {p} has no registry entry (left by an interrupted add/remove); the next add removes it")


@models.command()
@click.argument("version")
@click.option("--json", "as_json", is_flag=True, help="Print the registry entry and the file check as JSON.")
@click.pass_context
def info(ctx: click.Context, version: str, as_json: bool) -> None:
    """Everything about one version, and a re-hash of its files (exit status 1 if any is missing or changed).

    VERSION is v3, 3, champion or latest.

    \b
    Examples:
      builder models info v2
      builder models info champion --json
    """
    reg = _registry(ctx)
    with _user_errors():
        v, champion = reg.get(version), reg.load()["champion"]
        lineage, report = reg.lineage(v.id), reg.verify(v.id)
    bad = {p: why for p, why in report.items() if why != "ok"}
    if as_json:
        # "lineage" is the entry's own list of training pieces; the chain of registered versions is "ancestors"
        click.echo(json.dumps({**v.to_dict(), "champion": v.id == champion, "ancestors": lineage, "verify": report},
                              indent=2))
    else:
        click.echo(f"{v.id}  {v.kind}" + ("  (champion)" if v.id == champion else ""))
        rows = [("created", v.created), ("lineage", " <- ".join(lineage)), ("params", f"{v.params:,}"),
                ("tokenizer sha256", v.tokenizer_sha256), ("dataset manifest", v.dataset_manifest_sha256 or "-"),
                ("notes", v.notes or "-")]
        for key, val in rows:
            click.echo(f"  {key + ':':18} {val}")
        click.echo("training pieces:" + ("" if v.lineage else " not recorded"))
        for piece in v.lineage:
            click.echo("  " + ", ".join(f"{k} {piece.get(k)}" for k in ("name", "stage", "parent", "steps", "seed", "lr",
                                                                          "wall_seconds", "data_sha256")))
        for title, d in (("config", v.config), ("training", v.training), ("metrics", v.metrics)):
            click.echo(f"{title}:" + ("" if d else " -"))
            for key, val in d.items():
                click.echo(f"  {key} = {json.dumps(val) if isinstance(val, (dict, list)) else val}")
        click.echo("files:")
        for f in v.files:
            status = report[f["path"]]
            click.echo(f"  {'ok' if status == 'ok' else 'BAD':3}  {f['path']}  ({f['bytes']:,} bytes)"
                       + ("" if status == "ok" else f"  <- {status}"))
    if bad:
        raise click.ClickException(f"{len(bad)} of {len(report)} files of {v.id} failed verification: "
                                   + "; ".join(f"{p}: {why}" for p, why in bad.items()))


@models.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--tokenizer", "tokenizer_dir", required=True, type=click.Path(path_type=Path),
              help="The tokenizer folder the checkpoint was trained with (its sha256 must match).")
@click.option("--parent", default=None, help="The version this one was trained from (e.g. the pretrained base).")
@click.option("--notes", default="", help="Free text kept with the version.")
@click.option("--metrics", "metrics_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help='JSON object of metrics, e.g. {"val_bpb": 1.31, "grounded_qa": 0.62}.')
@click.option("--dataset-manifest", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Dataset manifest.json to record by sha256 [default: the one recorded in the checkpoint].")
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The recipe (models/recipes/*.json) that trained it: names its pieces in the lineage and fills "
                   "in those whose run folders are gone.")
@click.pass_context
def add(ctx: click.Context, checkpoint: Path, tokenizer_dir: Path, parent: str | None, notes: str,
        metrics_file: Path | None, dataset_manifest: Path | None, recipe_path: Path | None) -> None:
    """Copy CHECKPOINT (a model.pth) and its tokenizer into the registry as the next version vN.

    Steps, tokens, hardware, wall time and val_bpb are read from the checkpoint and, when it is still
    in its run folder, from run.json and metrics.jsonl beside it; so is its lineage (every training piece
    behind it: stage, parent, data hash, steps, seed, lr, wall time), following each run's base back to
    a run started from scratch. The version keeps a copy of that
    metrics.jsonl (training_metrics.jsonl) and, for a fine-tune, of its base run's (pretrain_metrics.jsonl):
    `builder card` draws the loss curve from them.

    \b
    Examples:
      builder models add runs/pretrain-small/model.pth --tokenizer runs/tokenizer
      builder models add runs/sft/model.pth --tokenizer runs/tokenizer --parent v1 \\
          --metrics eval.json --notes "SFT on chitchat + docs QA"
    """
    from source.files import sha256_file

    metrics = _json_object(metrics_file, "metrics") if metrics_file else None
    lineage = training = None
    if recipe_path:
        from builder.recipe import load_recipe, recipe_lineage
        from source.checkpoint import read_checkpoint
        from source.lineage import lineage_from_runs

        recipe = load_recipe(recipe_path)
        try:
            step = read_checkpoint(checkpoint).get("step")
        except (OSError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
        lineage = recipe_lineage(recipe, checkpoint, lineage_from_runs(checkpoint, step))
        training = {"recipe": {"name": recipe.name, "path": str(recipe_path), "sha256": sha256_file(recipe_path)}}
    with _user_errors():
        manifest_sha = sha256_file(dataset_manifest) if dataset_manifest else None
        v = _registry(ctx).add(checkpoint, tokenizer_dir, parent=parent, metrics=metrics, notes=notes,
                               dataset_manifest_sha256=manifest_sha, lineage=lineage, training=training)
    size = sum(f["bytes"] for f in v.files)
    click.echo(f"added {v.id} ({v.kind}, {_params(v.params)} params, parent {v.parent or '-'}): "
               f"{len(v.files)} files, {size / 1e6:.1f} MB in {_registry(ctx).root / 'versions' / v.id}")
    if v.metrics:
        click.echo("metrics: " + ", ".join(f"{k}={_metric(x)}" for k, x in sorted(v.metrics.items())))
    click.echo("lineage: " + (" -> ".join(f"{p.get('name')} ({p.get('stage')}, {p.get('steps')} steps)" for p in v.lineage)
                              or "not recorded (no run.json beside the checkpoint)"))


@models.command()
@click.argument("version")
@click.pass_context
def promote(ctx: click.Context, version: str) -> None:
    """Make VERSION the champion by hand (the model that `card`, `export` and `release` ship).

    \b
    Example:
      builder models promote v3
    """
    with _user_errors():
        v = _registry(ctx).promote(version)
    click.echo(f"champion: {v.id} (promoted by hand)")


@models.command()
@click.option("--auto", is_flag=True, help="Pick the champion by the rule and make it the champion.")
@click.pass_context
def champion(ctx: click.Context, auto: bool) -> None:
    """Show the champion and the rule; with --auto, apply the rule and say why it picked what it did.

    \b
    Examples:
      builder models champion
      builder models champion --auto
    """
    reg = _registry(ctx)
    with _user_errors():
        state = reg.load()
        if auto:
            vid, reason = reg.pick_champion()
            if vid is None:
                raise click.ClickException(f"no champion picked: {reason}")
            before = state["champion"]
            reg.promote(vid, reason=f"picked by the rule: {reason}")
            click.echo(f"champion: {vid}" + (" (unchanged)" if before == vid else f" (was {before or 'none'})"))
            click.echo(f"reason:   {reason}")
        else:
            click.echo(f"champion: {state['champion']} ({state['champion_reason']})" if state["champion"]
                       else "champion: none yet")
    click.echo(f"rule:     {CHAMPION_RULE}")


@models.command()
@click.argument("a")
@click.argument("b")
@click.pass_context
def diff(ctx: click.Context, a: str, b: str) -> None:
    """What changed from version A to version B: fields, config, training, metrics, files.

    \b
    Example:
      builder models diff v1 v2
    """
    with _user_errors():
        d = _registry(ctx).diff(a, b)
    click.echo(f"{d['a']} -> {d['b']}")
    empty = True
    for section in ("fields", "config", "training", "metrics", "files"):
        if not d[section]:
            continue
        empty = False
        click.echo(f"{section}:")
        for key, change in d[section].items():
            if section == "files":
                click.echo(f"  {key}: {change}")
            elif section == "metrics":
                x, y, delta = change
                click.echo(f"  {key}: {_metric(x)} -> {_metric(y)}" + (f" ({delta:+.4f})" if delta is not None else ""))
            else:
                click.echo(f"  {key}: {change[0]!r} -> {change[1]!r}")
    if empty:
        click.echo("no differences")


@models.command()
@click.argument("version")
@click.option("--force", is_flag=True, help="Also remove the champion (the registry is then left without one).")
@click.pass_context
def remove(ctx: click.Context, version: str, force: bool) -> None:
    """Delete VERSION and its folder. Its number is never reused; versions trained from it keep the link.

    \b
    Example:
      builder models remove v2
    """
    with _user_errors():
        v = _registry(ctx).remove(version, force=force)
    click.echo(f"removed {v.id}")
