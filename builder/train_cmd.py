"""`builder pretrain`: tokenize the corpus (cached) and run the pretraining loop."""

from __future__ import annotations

import json
from pathlib import Path

import click

SAMPLE_PROMPTS = ("The json module", "A closure is", "Hello! How are you")


def _configs(preset: str, overrides: tuple[str, ...], vocab_size: int):
    from source.config import model_config, split_overrides, train_config

    model_o, train_o = split_overrides(overrides)
    if not any(o.startswith("vocab_size=") for o in model_o):
        model_o = [*model_o, f"vocab_size={vocab_size}"]
    mcfg, tcfg = model_config(preset, model_o), train_config(preset, train_o)
    if mcfg.vocab_size != vocab_size:
        raise ValueError(f"vocab_size={mcfg.vocab_size} does not match the tokenizer's {vocab_size}")
    if tcfg.seq_len > mcfg.max_seq_len:
        raise ValueError(f"seq_len={tcfg.seq_len} exceeds the model's max_seq_len={mcfg.max_seq_len}")
    return mcfg, tcfg


def print_samples(model, tokenizer, prompts=SAMPLE_PROMPTS, max_new_tokens: int = 40) -> None:
    model.eval()
    for prompt in prompts:
        ids = [tokenizer.bos_id, *tokenizer.encode(prompt)]
        out = model.generate(ids, max_new_tokens, stop_ids=(tokenizer.eos_id,), temperature=0.8, top_k=40, seed=0)
        click.echo(f"  {prompt!r} -> {tokenizer.decode(out)!r}")


@click.command()
@click.option("--preset", default="tiny", show_default=True, type=click.Choice(["tiny", "small", "blueprint-700m"]),
              help="Model + training preset (source/config.py).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a ModelConfig or TrainConfig field, e.g. --set max_steps=500 --set lr=1e-3.")
@click.option("--data", "data_dir", default="datasets/built/default", show_default=True, type=click.Path(path_type=Path),
              help="Corpus folder from `builder data build`.")
@click.option("--tokenizer", "tokenizer_dir", default="runs/tokenizer", show_default=True,
              type=click.Path(path_type=Path), help="Folder from `builder tokenizer train`.")
@click.option("--out", "out_dir", default=None, type=click.Path(path_type=Path),
              help="Run folder [default: runs/pretrain-PRESET].")
@click.option("--time-budget", "time_budget", default=None, type=click.FloatRange(min=1), metavar="SECONDS",
              help="Fit max_steps to this much wall-clock time (measured on the first steps).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--samples/--no-samples", default=True, show_default=True, help="Print sample text at the end.")
def pretrain(preset: str, overrides: tuple[str, ...], data_dir: Path, tokenizer_dir: Path, out_dir: Path | None,
             resume: bool, samples: bool, time_budget: float | None) -> None:
    """Pretrain a model on the corpus.

    \b
    Examples:
      builder pretrain --preset tiny
      builder pretrain --preset small --set max_steps=3000 --out runs/base
      builder pretrain --preset small --out runs/base --resume
      accelerate launch --multi_gpu --num_processes 2 $(which builder) pretrain --preset tiny
    """
    from source.checkpoint import CheckpointError, load_model
    from source.token_data import TokenShards, build_token_shards, default_token_dir
    from source.tokenizer import Tokenizer
    from source.train import process_state, train

    if not (tokenizer_dir / "tokenizer.model").is_file():
        raise click.ClickException(f"{tokenizer_dir}: no tokenizer.model; run `builder tokenizer train` first")
    tok = Tokenizer.load(tokenizer_dir)
    try:
        mcfg, tcfg = _configs(preset, overrides, tok.vocab_size)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    out_dir = out_dir or Path("runs") / f"pretrain-{preset}"
    token_dir = default_token_dir(data_dir, tok)
    state = process_state()
    try:
        with state.main_process_first():  # one process tokenizes, the others find it cached
            meta = build_token_shards(data_dir, tok, token_dir, progress=state.is_main_process)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    data = TokenShards(token_dir, seed=tcfg.seed)
    if state.is_main_process:
        click.echo(f"data: {meta['train']['tokens']:,} train / {meta['val']['tokens']:,} val tokens ({token_dir})")
    try:
        result = train(mcfg, tcfg, data, out_dir, tokenizer_sha256=tok.sha256, kind="pretrain", resume=resume,
                       time_budget_s=time_budget,
                       metadata={"corpus_manifest_sha256": meta["corpus_manifest_sha256"], "preset": preset})
    except (FileNotFoundError, CheckpointError) as exc:  # nothing to resume, or a torn or foreign checkpoint
        raise click.ClickException(str(exc)) from None
    if not state.is_main_process:
        return
    click.echo(json.dumps({k: v for k, v in vars(result).items()}, indent=None))
    click.echo(f"checkpoint: {out_dir / 'model.pth'}")
    if samples:
        model, _ = load_model(out_dir / "model.pth")
        click.echo("samples (temperature 0.8, top-k 40):")
        print_samples(model, tok)
