"""`builder sft`: chat fine-tuning (full or LoRA) on top of a pretrained checkpoint or an imported base
(builder/sft_base.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click


def answer(model, tokenizer, example: dict, max_new_tokens: int = 80) -> str:
    """Greedy reply to an example's conversation up to its last user turn (the reply it trains on is
    left out), shown the example's context, through the runtime's prompt builder."""
    from source.evaluate import reply

    messages = example["messages"]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return reply(model, tokenizer, messages[:last_user + 1], example.get("context"), max_new_tokens)


def _check_same_base(out_dir: Path, base: Path, base_sha: str) -> None:
    """Resuming continues the weights in out_dir: if --base changed since the run started (e.g. the
    base was pretrained further), resuming would silently fine-tune the old base."""
    from source.checkpoint import CheckpointError
    from source.train import read_run_info

    try:
        started_from = read_run_info(out_dir).get("parent_sha256")
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from None
    if started_from and started_from != base_sha:
        raise click.ClickException(f"{out_dir} was started from a base with sha256 {started_from[:12]}..., but {base} "
                                   f"is now {base_sha[:12]}...: start a fresh run (another --out, or delete "
                                   f"{out_dir}) instead of --resume")


def _positive_finite(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not math.isfinite(value) or value <= 0:
        raise click.BadParameter(f"{value} is not a finite number > 0")
    return value


@click.command()
@click.option("--preset", default="tiny", show_default=True, type=click.Choice(["tiny", "small", "blueprint-700m"]),
              help="Training preset for fine-tuning (SFT_PRESETS in source/config.py).")
@click.option("--base", "base", required=True, type=click.Path(path_type=Path),
              help="The pretrained model.pth to start from, or the name of a base from `builder base import`.")
@click.option("--models-root", default="models", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Registry of imported bases; a run from a base is registered there as a new version.")
@click.option("--bf16", "bf16", is_flag=True, help="With --lora on an imported base: hold the frozen base in bf16.")
@click.option("--grad-checkpointing", is_flag=True, help="Recompute activations in backward: less memory, ~30% slower.")
@click.option("--data", "data_dir", default="datasets/built/sft", show_default=True, type=click.Path(path_type=Path),
              help="Folder from `builder sft-data` (train.jsonl, test.jsonl).")
@click.option("--tokenizer", "tokenizer_dir", default="runs/tokenizer", show_default=True,
              type=click.Path(path_type=Path), help="Folder from `builder tokenizer train`.")
@click.option("--out", "out_dir", default=None, type=click.Path(path_type=Path), help="Run folder [default: runs/sft-PRESET].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a TrainConfig field.")
@click.option("--lora", is_flag=True, help="Train LoRA adapters instead of all weights (merged into model.pth).")
@click.option("--lora-rank", default=16, show_default=True, type=click.IntRange(1, 1024))
@click.option("--lora-alpha", default=32.0, show_default=True, type=float, callback=_positive_finite,
              help="LoRA scale numerator (scale = alpha / rank): a finite number > 0.")
@click.option("--time-budget", "time_budget", default=None, type=click.FloatRange(min=1), metavar="SECONDS",
              help="Fit max_steps to this much wall-clock time (measured on the first steps).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--samples", default=3, show_default=True, help="Held-out questions to answer at the end.")
def sft(preset: str, base: Path, models_root: Path, bf16: bool, grad_checkpointing: bool, data_dir: Path,
        tokenizer_dir: Path, out_dir: Path | None, overrides: tuple[str, ...], lora: bool, lora_rank: int,
        lora_alpha: float, resume: bool, samples: int, time_budget: float | None) -> None:
    """Fine-tune a pretrained model to chat; the loss covers assistant tokens only.

    \b
    Examples:
      builder sft --preset tiny --base runs/pretrain-tiny/model.pth
      builder sft --preset small --base runs/base-small/model.pth --lora --lora-rank 16
      builder sft --preset small --base runs/base-small/model.pth --out runs/sft-small --resume
      builder sft --base SmolLM2-135M-Instruct --lora --bf16 --data datasets/built/sft   # an imported base
    """
    from builder.sft_base import find_base

    if not base.exists() and (entry := find_base(models_root, str(base))) is not None:
        return _sft_from_base(entry, preset, models_root, bf16, grad_checkpointing, data_dir, out_dir, overrides, lora,
                              lora_rank, lora_alpha, resume, samples, time_budget)
    if bf16:
        raise click.ClickException("--bf16 is for an imported base (--base NAME); a .pth trains in its preset's "
                                   "precision (--set precision=bf16|fp32)")
    from source.checkpoint import CheckpointError, load_model, read_checkpoint
    from source.files import sha256_file
    from source.config import ModelConfig, train_config
    from source.sft_batches import ChatBatches, read_jsonl
    from source.tokenizer import Tokenizer
    from source.train import process_state, train

    if not (tokenizer_dir / "tokenizer.model").is_file():
        raise click.ClickException(f"{tokenizer_dir}: no tokenizer.model; run `builder tokenizer train` first")
    tok = Tokenizer.load(tokenizer_dir)
    try:
        base_ckpt = read_checkpoint(base)
        if base_ckpt["tokenizer"] != tok.sha256:
            raise ValueError(f"{base} was trained with tokenizer {base_ckpt['tokenizer'][:12]}, "
                             f"but {tokenizer_dir} is {tok.sha256[:12]}")
        tcfg = train_config(preset, list(overrides), sft=True)
        max_seq = base_ckpt["config"]["max_seq_len"]
        if tcfg.seq_len > max_seq:
            raise ValueError(f"seq_len={tcfg.seq_len} exceeds the base model's max_seq_len={max_seq}")
        data = ChatBatches(data_dir, tok, tcfg.seq_len, seed=tcfg.seed, prompt_loss_weight=tcfg.prompt_loss_weight)
        if base_ckpt.get("kind") in ("sft", "lora-merged") and (base_ckpt.get("train_config") or {}).get("seed") == tcfg.seed:
            click.echo(f"note: {base} was fine-tuned with seed {tcfg.seed} too, so this run starts with the same "
                       "chats in the same order; pass --set seed=N to continue on others")
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    out_dir = out_dir or Path("runs") / f"sft-{preset}"
    base_sha = sha256_file(base)
    if resume:
        _check_same_base(out_dir, base, base_sha)
    state = process_state()
    if state.is_main_process:
        click.echo(f"data: {len(data):,} train chats, {len(data.splits['val']):,} held-out ({data_dir})")
    try:
        result = train(ModelConfig(**base_ckpt["config"]), tcfg, data, out_dir, tokenizer_sha256=tok.sha256,
                       kind="lora-merged" if lora else "sft", resume=resume, init_from=base,
                       lora_rank=lora_rank if lora else 0, lora_alpha=lora_alpha, time_budget_s=time_budget,
                       init_model=_with_checkpointing(base) if grad_checkpointing else None,
                       metadata={"parent_checkpoint": str(base), "parent_sha256": base_sha, "preset": preset,
                                 "sft_data": str(data_dir), "base_step": base_ckpt.get("step"),
                                 # the lineage's data hash: the chats this run read, not a folder name
                                 "sft_data_sha256": sha256_file(data_dir / "train.jsonl")})
    except (FileNotFoundError, CheckpointError) as exc:  # nothing to resume, or a torn or foreign checkpoint
        raise click.ClickException(str(exc)) from None
    if not state.is_main_process:
        return
    click.echo(json.dumps(vars(result)))
    click.echo(f"checkpoint: {out_dir / 'model.pth'}")
    if samples:
        model, _ = load_model(out_dir / "model.pth")
        for example in read_jsonl(data_dir / "test.jsonl")[:samples]:
            question = [m for m in example["messages"] if m["role"] == "user"][-1]["content"]
            click.echo(f"  Q: {question}\n  A: {answer(model, tok, example)}")


def _with_checkpointing(path: Path):
    def init_model():
        from dataclasses import replace

        from source.checkpoint import load_model

        model, _ = load_model(path)
        model.cfg = replace(model.cfg, gradient_checkpointing=True)
        return model
    return init_model


def _sft_from_base(entry: dict, preset: str, models_root: Path, bf16: bool, grad_checkpointing: bool, data_dir: Path,
                   out_dir: Path | None, overrides: tuple[str, ...], lora: bool, lora_rank: int, lora_alpha: float,
                   resume: bool, samples: int, time_budget: float | None) -> None:
    """`builder sft --base NAME`: fine-tune an imported base, then register the result as a version."""
    from builder.sft_base import prepare, register
    from source.checkpoint import CheckpointError, load_model
    from source.config import train_config
    from source.files import sha256_file
    from source.sft_batches import ChatBatches, read_jsonl
    from source.train import process_state, read_run_info, train

    out_dir = out_dir or Path("runs") / f"sft-{entry['name']}"
    try:
        tcfg = train_config(preset, list(overrides), sft=True)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    tok, init_model, cfg, metadata = prepare(entry, out_dir, lora, bf16, grad_checkpointing, tcfg.seq_len)
    if resume:
        try:
            started = read_run_info(out_dir).get("base") or {}
        except CheckpointError as exc:
            raise click.ClickException(str(exc)) from None
        if started.get("files") != metadata["base"]["files"]:
            raise click.ClickException(f"{out_dir} was not started from base {entry['name']} as it is now: start "
                                       "a fresh run (another --out) instead of --resume")
    try:
        data = ChatBatches(data_dir, tok, tcfg.seq_len, seed=tcfg.seed, prompt_loss_weight=tcfg.prompt_loss_weight)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"data: {len(data):,} train chats, {len(data.splits['val']):,} held-out ({data_dir}); base "
               f"{entry['name']} ({cfg.n_layers} layers, dim {cfg.dim}, vocab {cfg.vocab_size})")
    try:
        result = train(cfg, tcfg, data, out_dir, tokenizer_sha256=tok.sha256, kind="lora-merged" if lora else "sft",
                       resume=resume, init_model=init_model, lora_rank=lora_rank if lora else 0,
                       lora_alpha=lora_alpha, time_budget_s=time_budget,
                       metadata={**metadata, "preset": preset, "sft_data": str(data_dir),
                                 "sft_data_sha256": sha256_file(data_dir / "train.jsonl")})
    except (FileNotFoundError, CheckpointError) as exc:
        raise click.ClickException(str(exc)) from None
    if not process_state().is_main_process:
        return
    click.echo(json.dumps(vars(result)))
    click.echo(f"checkpoint: {out_dir / 'model.pth'}")
    register(out_dir, models_root, entry)
    if samples:
        model, _ = load_model(out_dir / "model.pth")
        for example in read_jsonl(data_dir / "test.jsonl")[:samples]:
            question = [m for m in example["messages"] if m["role"] == "user"][-1]["content"]
            click.echo(f"  Q: {question}\n  A: {answer(model, tok, example)}")
