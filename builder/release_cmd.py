"""`builder release`: data -> tokenizer -> pretrain -> index -> sft -> eval/registry -> export -> card -> site -> docs."""

from __future__ import annotations

import time

import click

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
def release(profile: str, start: str | None, only: str | None, accept_corpus_change: bool) -> None:
    """The maintainer's one command: corpus to a GitHub Pages folder (dist/pages: the chat site at
    the root, the docs under docs/) plus dist/release-manifest.json.

    Each stage is skipped ("cached") when its inputs are unchanged. With the committed champion and an
    unchanged recipe the training stages are cached and the release goes straight to
    export, card, site and docs (a few minutes). A failing export gate stops the release and leaves
    the published folder as it was.

    \b
    Examples:
      builder release                      # the committed champion -> dist/pages
      builder release --profile quick      # tiny model, every stage, from an empty checkout
      builder release --from export        # re-export, re-render the card, rebuild site and docs
      builder release --only docs
    """
    from builder.cli import main

    if start and only:
        raise click.UsageError("--from and --only do not go together")

    def cli(args: list[str]) -> None:
        main.main(args=args, prog_name="builder", standalone_mode=False)

    started = time.perf_counter()
    r = Release(PROFILES[profile], cli, log=click.echo, accept_corpus_change=accept_corpus_change)
    stages, forced = select(start, only)
    try:
        r.execute(stages, forced)
        if not any(s.name == "site" for s in stages):  # --only data/index/export/...: nothing new to publish
            for s in r.report:
                click.echo(f"{s['stage']:<10} {s['status']:<7} {s['seconds']:>8.1f}  {s['note']}")
            click.echo(f"release: --only {only}; dist/pages left as it was")
            return
        if not (r.export / "manifest.json").is_file():
            raise click.ClickException("no export to publish: run `builder release --only export` first")
        summary = r.publish(started)
    except click.ClickException as exc:
        done = [s["stage"] for s in r.report]
        where = next((n for n in STAGE_NAMES if n not in done and any(s.name == n for s in stages)), "publish")
        raise click.ClickException(f"release stopped at stage '{where}': {exc.format_message()}\n"
                                   f"dist/pages was left as it was.") from None
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
