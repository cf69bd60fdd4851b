"""`builder dpo`: preference tuning (DPO) of an SFT model, on user pairs and/or pairs mined from its answers."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click


@click.command()
@click.option("--base", "base", required=True, type=click.Path(path_type=Path),
              help="The SFT model.pth to tune; it is also the frozen reference.")
@click.option("--out", "out_dir", default=None, type=click.Path(path_type=Path), help="Run folder [default: runs/dpo-PRESET].")
@click.option("--pairs", "pair_files", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help='Preference file (JSONL: "prompt" or "messages", "chosen", "rejected", optional "context"); repeatable.')
@click.option("--mine", default=0, show_default=True, type=click.IntRange(min=0), metavar="N",
              help="Mine pairs from the model's greedy answers to N seeded examples of --data/train.jsonl.")
@click.option("--data", "data_dir", default="datasets/built/sft", show_default=True, type=click.Path(path_type=Path),
              help="SFT data folder whose train.jsonl --mine samples.")
@click.option("--tokenizer", "tokenizer_dir", default="runs/tokenizer", show_default=True,
              type=click.Path(path_type=Path), help="Folder from `builder tokenizer train`.")
@click.option("--preset", default="tiny", show_default=True, type=click.Choice(["tiny", "small", "blueprint-700m"]),
              help="Training preset (DPO_PRESETS in source/dpo.py).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a TrainConfig field or beta / mine_tokens / chosen_nll, e.g. --set beta=0.1 --set lr=2e-5.")
@click.option("--skip-bad", is_flag=True, help="Skip and count bad lines in --pairs files instead of failing.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bars or per-log lines.")
def dpo(base: Path, out_dir: Path | None, pair_files: tuple[Path, ...], mine: int, data_dir: Path, tokenizer_dir: Path,
        preset: str, overrides: tuple[str, ...], skip_bad: bool, resume: bool, quiet: bool) -> None:
    """Tune an SFT model towards preferred replies with DPO; the SFT model stays the frozen reference.

    Reports the loss, the reward margin (chosen minus rejected implicit reward, beta * log-ratio to the
    reference) and the share of pairs with a positive margin as it trains, and both again on the held-out
    pairs at the end. The output model.pth (kind "dpo") is a normal checkpoint for `builder models add`.

    \b
    Examples:
      builder dpo --base runs/sft-tiny/model.pth --pairs prefs.jsonl
      builder dpo --preset small --base runs/sft-small/model.pth --mine 2000 --set beta=0.1
      builder dpo --preset small --base runs/sft-small/model.pth --mine 2000 --out runs/dpo-small --resume
    """
    from tqdm import tqdm

    from builder.dpo_mine import PAIRS, STATS, mine as mine_pairs, reusable
    from builder.sft_cmd import _check_same_base
    from source.checkpoint import CheckpointError, load_model, read_checkpoint
    from source.config import ModelConfig
    from source.dpo import PairBatches, dpo_configs, load_pairs, make_loss_fn, pair_stats, reference_logps
    from source.files import sha256_file
    from source.tokenizer import Tokenizer
    from source.train import train

    if not (tokenizer_dir / "tokenizer.model").is_file():
        raise click.ClickException(f"{tokenizer_dir}: no tokenizer.model; run `builder tokenizer train` first")
    if not pair_files and not mine:
        raise click.ClickException("no pairs to learn from: pass --pairs FILE and/or --mine N")
    out_dir = out_dir or Path("runs") / f"dpo-{preset}"
    tok = Tokenizer.load(tokenizer_dir)
    pairs, sources = [], {}
    try:
        base_ckpt = read_checkpoint(base)
        if base_ckpt["tokenizer"] != tok.sha256:
            raise ValueError(f"{base} was trained with tokenizer {base_ckpt['tokenizer'][:12]}, "
                             f"but {tokenizer_dir} is {tok.sha256[:12]}")
        tcfg, dcfg = dpo_configs(preset, list(overrides))
        if tcfg.seq_len > base_ckpt["config"]["max_seq_len"]:
            raise ValueError(f"seq_len={tcfg.seq_len} exceeds the base model's max_seq_len={base_ckpt['config']['max_seq_len']}")
        base_sha = sha256_file(base)
        if resume:
            _check_same_base(out_dir, base, base_sha)
        for path in pair_files:
            loaded, bad = load_pairs(path, skip_bad)
            pairs += loaded
            sources[str(path)] = {"pairs": len(loaded), "skipped_bad": bad}
        if mine:
            sft_file = data_dir / "train.jsonl"
            if not sft_file.is_file():
                raise FileNotFoundError(f"{sft_file}: no SFT data to mine; run `builder sft-data` or pass --data")
            if resume and reusable(out_dir, base, sft_file, mine, tcfg.seed, dcfg.mine_tokens):
                stats = json.loads((out_dir / STATS).read_text())
            else:
                stats = mine_pairs(base, tokenizer_dir, sft_file, mine, tcfg.seed, dcfg.mine_tokens, out_dir, not quiet)
            mined, _ = load_pairs(out_dir / PAIRS)
            pairs += mined
            sources[str(out_dir / PAIRS)] = stats
            click.echo(f"mined {stats['pairs']} pairs from {stats['examples']} examples: "
                       + ", ".join(f"{k} {v}" for k, v in stats["reasons"].items()))
        data = PairBatches(pairs, tok, tcfg.seq_len, seed=tcfg.seed)
    except (FileNotFoundError, ValueError) as exc:  # CheckpointError is a ValueError
        raise click.ClickException(str(exc)) from None
    held_out = "held-out" if data.splits["val"] is not data.splits["train"] else "training"
    click.echo(f"pairs: {len(data)} train, {len(data.splits['val'])} {held_out} for evaluation"
               + (f", {data.dropped} dropped (reply cut off at seq_len={tcfg.seq_len})" if data.dropped else ""))

    reference, _ = load_model(base)
    reference_logps(reference, data)  # once per pair, from the frozen SFT weights
    del reference

    def on_log(record: dict) -> None:
        if not quiet:
            tqdm.write(f"step {record['step']}: loss {record['loss']:.4f}, margin {record['margin']:+.4f}, "
                       f"accuracy {record['accuracy']:.2f}")

    try:
        result = train(ModelConfig(**base_ckpt["config"]), tcfg, data, out_dir, tokenizer_sha256=tok.sha256, kind="dpo",
                       resume=resume, init_from=base, progress=not quiet, on_log=on_log,
                       loss_fn=make_loss_fn(dcfg.beta, dcfg.chosen_nll),
                       metadata={"parent_checkpoint": str(base), "parent_sha256": base_sha, "preset": preset,
                                 "base_step": base_ckpt.get("step"), "dpo": asdict(dcfg), "pairs": sources})
    except (FileNotFoundError, CheckpointError) as exc:
        raise click.ClickException(str(exc)) from None
    model, _ = load_model(out_dir / "model.pth")
    after = pair_stats(model, data, "val", dcfg.beta)
    click.echo(json.dumps(vars(result)))
    click.echo(f"{held_out} pairs ({after['pairs']}): loss {after['loss']:.4f} (reference: {0.6931:.4f}), "
               f"reward margin {after['margin']:+.4f}, accuracy {after['accuracy']:.2f}")
    click.echo(f"checkpoint: {out_dir / 'model.pth'}")
