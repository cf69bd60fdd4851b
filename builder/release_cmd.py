"""`builder release`: data -> tokenizer -> pretrain -> index -> sft -> eval/registry -> export -> card -> site -> docs."""

from __future__ import annotations

import time
from pathlib import Path

import click

from builder.recipe import PAUSED_EXIT, RECIPES, Paused, load_recipe, retrain_stages
from builder.release import PROFILES, STAGE_NAMES, Release, select


@click.command()
@click.option("--profile", type=click.Choice(sorted(PROFILES)), default="default", show_default=True,
              help="default: the small champion (training cached while models/release.lock.json matches); "
                   "quick: the tiny preset end to end into dist/quick/.")
@click.option("--from", "start", type=click.Choice(STAGE_NAMES), default=None,
              help="Re-run this stage and every one after it, cached or not.")
@click.option("--only", type=click.Choice(STAGE_NAMES), default=None, help="Run just this stage (forced).")
@click.option("--accept-corpus-change", is_flag=True,
              help="Continue when the built corpus differs from datasets/manifests/default.json, and rewrite "
                   "that file (review and commit it).")
@click.option("--retrain", is_flag=True,
              help="Train the champion again from its recipe file, piece by piece (finished pieces are skipped, "
                   "interrupted ones resumed), register it, then release as usual.")
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --retrain: the recipe to replay [default: models/recipes/champion.json; "
                   "models/recipes/quick.json for --profile quick].")
@click.option("--max-minutes", type=click.FloatRange(min=0), default=None,
              help="With --retrain: start no new piece after this many minutes (exit status 3; run the same "
                   "command again to continue).")
@click.option("--only-training", is_flag=True,
              help="With --retrain: stop after the registry (no export, card, site or docs).")
def release(profile: str, start: str | None, only: str | None, accept_corpus_change: bool, retrain: bool,
            recipe_path: Path | None, max_minutes: float | None, only_training: bool) -> None:
    """The maintainer's one command: corpus to a GitHub Pages folder (dist/pages: the chat site at
    the root, the docs under docs/) plus dist/release-manifest.json.

    Each stage is skipped ("cached") when its inputs are unchanged. With the committed champion and an
    unchanged recipe the training stages are cached and the release goes straight to
    export, card, site and docs (a few minutes). A failing export gate stops the release and leaves
    the published folder as it was.

    With --retrain the training is replayed from the recipe file instead (corpus, tokenizer, index,
    chat data, then each training piece); the result is registered with its lineage and crowned by the
    rule if it wins.

    \b
    Examples:
      builder release                      # the committed champion -> dist/pages
      builder release --profile quick      # tiny model, every stage, from an empty checkout
      builder release --from export        # re-export, re-render the card, rebuild site and docs
      builder release --only docs
      builder release --retrain --only-training --max-minutes 90   # the champion, in chunks
      builder release --retrain --profile quick                    # the tiny recipe, end to end
    """
    from builder.cli import main

    if start and only:
        raise click.UsageError("--from and --only do not go together")
    if (recipe_path or max_minutes is not None or only_training) and not retrain:
        raise click.UsageError("--recipe, --max-minutes and --only-training go with --retrain")
    if retrain and (start or only):
        raise click.UsageError("--retrain replays the whole recipe: leave out --from and --only")

    def cli(args: list[str]) -> None:
        main.main(args=args, prog_name="builder", standalone_mode=False)

    started = time.perf_counter()
    r = Release(PROFILES[profile], cli, log=click.echo, accept_corpus_change=accept_corpus_change)
    if retrain:
        recipe = load_recipe(recipe_path or Path(RECIPES[profile]))
        click.echo(f"release: retraining from {recipe.path}: {len(recipe.pieces)} pieces "
                   f"({', '.join(p.name for p in recipe.pieces)})")
        deadline = time.monotonic() + max_minutes * 60 if max_minutes is not None else None
        stages, forced = retrain_stages(recipe, deadline, only_training), set()
    else:
        stages, forced = select(start, only)
    try:
        r.execute(stages, forced)
        if not any(s.name == "site" for s in stages):  # --only data/index/export/...: nothing new to publish
            for s in r.report:
                click.echo(f"{s['stage']:<10} {s['status']:<7} {s['seconds']:>8.1f}  {s['note']}")
            click.echo(f"release: --only {only}; dist/pages left as it was" if only else
                       "release: training only; dist/pages left as it was")
            return
        if not (r.export / "manifest.json").is_file():
            raise click.ClickException("no export to publish: run `builder release --only export` first")
        summary = r.publish(started)
    except click.ClickException as exc:
        done = [s["stage"] for s in r.report]
        where = next((s.name for s in stages if s.name not in done), "publish")
        raise click.ClickException(f"release stopped at stage '{where}': {exc.format_message()}\n"
                                   f"dist/pages was left as it was.") from None
    except Paused as exc:  # --max-minutes: a clean stop between pieces, not a failure
        click.echo(f"release: {exc}")
        raise click.exceptions.Exit(PAUSED_EXIT) from None
    click.echo("")
    click.echo(f"{'stage':<10} {'status':<7} {'seconds':>8}  note")
    for s in summary["stages"]:
        click.echo(f"{s['stage']:<10} {s['status']:<7} {s['seconds']:>8.1f}  {s['note']}")
    required = [g for g in summary["gates"] if g["required"]]
    below = [f"{g['name']} ({g['value']})" for g in summary["gates"] if not g["required"] and g["passed"] is False]
    click.echo(f"gates: {sum(bool(g['passed']) for g in required)}/{len(required)} required passed"
               + (f"; reported below target: {', '.join(below)}" if below else ""))
    click.echo(f"release: champion {summary['champion']} -> {r.pages} ({summary['pages_bytes'] / 1e6:.1f} MB), "
               f"dist/release-manifest.json, {summary['seconds']:.0f} s")
    click.echo(f"serve it: python -m http.server -d {r.pages} 8000  ->  http://127.0.0.1:8000/")
