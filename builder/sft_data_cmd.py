"""`builder sft-data`: chat fine-tuning examples, thin over `source.sft_data` and `source.helper_client`."""

from __future__ import annotations

import time
from pathlib import Path

import click


@click.command("sft-data")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("datasets/built/default"), show_default=True, help="Built corpus (builder data build).")
@click.option("--index", "index_path", type=click.Path(file_okay=False, path_type=Path),
              default=Path("datasets/built/index"), show_default=True,
              help="Retrieval index of that corpus (builder index build).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("datasets/built/sft"), show_default=True,
              help="Output folder: train.jsonl, test.jsonl, stats.json (+ helper.jsonl).")
@click.option("--add", "add", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Your own examples (JSONL, messages or instruction/output format), appended to train; "
                   "repeatable.")
@click.option("--skip-bad", is_flag=True, help="Skip and count bad lines in --add files instead of failing.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="About N generated examples in all (default ~40k), spread over the sources as usual.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling and shuffling.")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Tokenizer that enforces --max-tokens [default: runs/tokenizer when it exists].")
@click.option("--max-tokens", type=click.IntRange(min=64), default=512, show_default=True,
              help="Token budget of one encoded example; passages are clipped to fit.")
@click.option("--helper-url", default=None, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 "
                                                 "(key from $SUPERMIX_HELPER_API_KEY).")
@click.option("--helper-model", default=None, help="Model name to ask at --helper-url.")
@click.option("--helper-count", type=click.IntRange(min=0), default=200, show_default=True,
              help="Helper-written examples to have in OUT/helper.jsonl (resumes where it stopped).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def sft_data(data_dir: Path, index_path: Path, out_dir: Path, add: tuple[Path, ...], skip_bad: bool,
             limit: int | None, seed: int, tokenizer_dir: Path | None, max_tokens: int, helper_url: str | None,
             helper_model: str | None, helper_count: int, quiet: bool) -> None:
    """Generate chat examples for fine-tuning: grounded Q&A with cited sources, "I don't know"
    answers, chit-chat, plus your own files and (optionally) a helper model's.

    \b
    Examples:
      builder sft-data                                  # ~40k examples from the default corpus
      builder sft-data --limit 2000 --out /tmp/sft      # a quick small set
      builder sft-data --add my_chats.jsonl --skip-bad  # plus your examples
      builder sft-data --helper-url http://127.0.0.1:8000/v1 --helper-model qwen2.5-7b-instruct

    \b
    A line of an --add file is either
      {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
    (roles system/user/assistant, optional "context": [{"title", "text"}]) or
      {"instruction": "...", "input": "...", "output": "..."}   ("input" optional).
    Entities whose name hashes into the held-out 5% appear only in test.jsonl.
    """
    from source.helper_client import HelperError, generate_with_helper
    from source.sft_data import build_sft_data
    from source.sft_format import load_examples
    from source.tokenizer import Tokenizer

    if not (data_dir / "manifest.json").is_file() or not any(data_dir.glob("train-*.parquet")):
        raise click.ClickException(f"no built corpus in {data_dir}: run `builder data build` first")
    if not (index_path / "meta.json").is_file():
        raise click.ClickException(f"retrieval index {index_path} not found: run `builder index build` first")
    if bool(helper_url) != bool(helper_model):
        raise click.ClickException("--helper-url and --helper-model go together")
    for p in add:  # fail fast on bad user files, before minutes of generation
        try:
            load_examples(p, skip_bad)
        except (OSError, ValueError) as e:
            raise click.ClickException(str(e)) from None
    tokenizer = None
    tok_dir = tokenizer_dir or Path("runs/tokenizer")
    if (tok_dir / "tokenizer.model").is_file():
        tokenizer = Tokenizer.load(tok_dir)
    elif tokenizer_dir is not None:
        raise click.ClickException(f"{tokenizer_dir}/tokenizer.model not found: run `builder tokenizer train` "
                                   "first or leave out --tokenizer")
    else:
        click.echo(f"note: no tokenizer at {tok_dir}; passages are clipped by characters only", err=True)

    t0 = time.time()
    helper_examples: list[dict] = []
    if helper_url and helper_count:
        out_dir.mkdir(parents=True, exist_ok=True)
        helper_file = out_dir / "helper.jsonl"
        try:
            h = generate_with_helper(data_dir, helper_file, helper_url, helper_model, helper_count, index_path,
                                     seed, tokenizer=tokenizer, max_tokens=max_tokens, progress=not quiet)
        except HelperError as e:
            raise click.ClickException(f"helper: {e}\n{helper_file} keeps what was written; rerun to resume") \
                from None
        click.echo(f"helper: {h.get('existing', 0)} already there, {h.get('written', 0)} new, "
                   f"{h.get('duplicates', 0)} duplicates, {h.get('bad_replies', 0)} bad replies skipped")
        helper_examples, _ = load_examples(helper_file, skip_bad=True)
    try:
        stats = build_sft_data(data_dir, index_path, out_dir, seed, total=limit, add=add, skip_bad=skip_bad,
                               tokenizer=tokenizer, max_tokens=max_tokens, helper_examples=helper_examples,
                               progress=not quiet)
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(summary(stats))
    click.echo(f"wrote {out_dir}/train.jsonl, test.jsonl, stats.json in {time.time() - t0:.1f}s")


def summary(stats: dict) -> str:
    """Examples per kind/source, train and test."""
    keys = sorted(set(stats["train"]["by_kind_source"]) | set(stats["test"]["by_kind_source"]))
    rows = [("kind/source", "train", "test")]
    rows += [(k, str(stats["train"]["by_kind_source"].get(k, 0)), str(stats["test"]["by_kind_source"].get(k, 0)))
             for k in keys]
    rows.append(("total", str(stats["train"]["total"]), str(stats["test"]["total"])))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    skipped = ", ".join(f"{k} {v}" for k, v in stats["skipped"].items())
    bad = sum(stats["bad_lines"].values())
    if skipped:
        lines.append(f"skipped: {skipped}")
    if bad:
        lines.append(f"bad lines skipped in --add files: {bad}")
    return "\n".join(lines)
