"""Training throughput: our model and loop vs Hugging Face LlamaForCausalLM, same config, same batches.

    python benchmarks/train_throughput.py [--preset small] [--steps 100] [--batch 16] [--seq 512]

Rows, measured in this one process on identical batches, interleaved in chunks of `--chunk` steps (the
order rotating each round); a row's tokens/s is the median over its chunks, so a burst of load from other
processes moves one chunk, not the figure. On a machine another job keeps busy, `--threads 1 --clock cpu`
times each chunk in CPU seconds of this process (time.process_time), which waiting for a core does not
inflate; the table then reads tokens per CPU-second:
- `hf-fp32`: transformers' LlamaForCausalLM (its default fp32), our weights loaded, AdamW
- `hf-bf16`: the same under bf16 autocast, so the bf16 gain is compared like for like
- `ours-fp32`: our Transformer, fp32
- `ours-bf16`: our Transformer under bf16 autocast (the default `precision=bf16`)
- `ours-bf16-compile` (with --compile): plus torch.compile
Each row reports tokens/s (after `--warmup` untimed steps), MFU against the dense matmul peak measured
here for its dtype, and the val loss after training (evaluated in fp32 on the same held-out batches).
Targets: ours-bf16 >= 2x hf-fp32 tokens/s, and its val loss within 1% of ours-fp32 at equal tokens.
Data: the token shards `builder pretrain` made (`--tokens runs/tokens/...`), else random tokens (val loss
then meaningless, and the table says so).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from source.config import model_config, train_config
from source.model import Transformer, hf_config_dict, hf_state_dict
from source.train import flops_per_token, make_optimizer, measure_peak_flops


def find_tokens(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    found = sorted(Path("runs/tokens").glob("*/meta.json"))
    return found[0].parent if found else None


def batches(tokens_dir: Path | None, vocab: int, batch: int, seq: int, n: int, split: str):
    if tokens_dir is not None:
        from source.token_data import TokenShards

        shards = TokenShards(tokens_dir, seed=0)
        return [shards.batch(split, batch, seq, step=i) for i in range(n)]
    gen = torch.Generator().manual_seed(0 if split == "train" else 1)
    out = []
    for _ in range(n):
        w = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
        out.append((w[:, :-1], w[:, 1:]))
    return out


class Row:
    """One contender: its own model and optimizer, advanced a chunk of steps at a time so that rows
    interleave and any background load falls on all of them alike."""

    def __init__(self, name: str, init_state: dict, cfg, bf16: bool, compile_: bool, hf: bool):
        self.name, self.bf16 = name, bf16
        torch.manual_seed(0)
        if hf:
            from transformers import LlamaConfig, LlamaForCausalLM

            fields = {k: v for k, v in hf_config_dict(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
            model = LlamaForCausalLM(LlamaConfig(**fields))
            model.load_state_dict(hf_state_dict_from(init_state, cfg))
            # the same loss as ours (fp32 upcast + cross-entropy over all T targets); HF's `labels=` path
            # would shift internally and drop the last target
            self.forward = lambda x, y: F.cross_entropy(model(input_ids=x).logits.float().flatten(0, 1), y.flatten())
        else:
            model = Transformer(cfg)
            model.load_state_dict(init_state)
            fn = torch.compile(model) if compile_ else model
            self.forward = lambda x, y: fn(x, y)[1]
        self.model = model
        self.opt = make_optimizer(model, train_config("small", ["lr=1e-3", "warmup_steps=0"]))
        self.rates: list[float] = []  # tokens/s of each timed chunk

    def advance(self, batches: list, timed: bool, clock=time.perf_counter) -> None:
        self.model.train()
        t0 = clock()
        for x, y in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.forward(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        if timed:
            self.rates.append(sum(x.numel() for x, _ in batches) / (clock() - t0))

    @property
    def tok_s(self) -> float:
        return statistics.median(self.rates)

    @torch.no_grad()
    def val_loss(self, val_b: list) -> float:
        self.model.eval()
        return sum(float(self.forward(x, y)) for x, y in val_b) / len(val_b)


def hf_state_dict_from(state: dict, cfg) -> dict:
    model = Transformer(cfg)
    model.load_state_dict(state)
    return hf_state_dict(model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--val-batches", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=5, help="steps per row before switching rows")
    ap.add_argument("--tokens", default=None, help="token shard folder (default: the first under runs/tokens)")
    ap.add_argument("--compile", action="store_true", help="add an ours-bf16-compile row")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="time chunks by the wall clock or by this process' CPU time (use with --threads 1)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    tokens_dir = find_tokens(args.tokens)
    vocab = None
    if tokens_dir is not None:
        import json

        vocab = json.loads((tokens_dir / "meta.json").read_text())["vocab_size"]
    cfg = model_config(args.preset, [f"vocab_size={vocab}"] if vocab else [])
    train_b = batches(tokens_dir, cfg.vocab_size, args.batch, args.seq, args.steps + args.warmup, "train")
    val_b = batches(tokens_dir, cfg.vocab_size, args.batch, args.seq, args.val_batches, "val")
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in Transformer(cfg).state_dict().items()}
    n_params = sum(v.numel() for k, v in init.items() if k != "lm_head.weight")
    fpt = flops_per_token(cfg, n_params, args.seq)
    # MFU needs a wall-clock peak of the same cores: left out when timing CPU seconds
    peak = None if args.clock == "cpu" else {bf16: measure_peak_flops(torch.bfloat16 if bf16 else torch.float32)
                                             for bf16 in (False, True)}

    specs = [("hf-fp32", False, False, True), ("ours-fp32", False, False, False), ("hf-bf16", True, False, True),
             ("ours-bf16", True, False, False)]
    if args.compile:
        specs.append(("ours-bf16-compile", True, True, False))
    rows = [Row(name, init, cfg, bf16, comp, hf) for name, bf16, comp, hf in specs]
    for row in rows:
        row.advance(train_b[:args.warmup], timed=False)
    for n, start in enumerate(range(args.warmup, len(train_b), args.chunk)):
        for row in rows[n % len(rows):] + rows[:n % len(rows)]:
            row.advance(train_b[start:start + args.chunk], timed=True, clock=clock)
        print(f"  step {min(len(train_b), start + args.chunk) - args.warmup}/{args.steps}: "
              + ", ".join(f"{r.name} {r.rates[-1]:,.0f}" for r in rows) + " tok/s", flush=True)
    results = [{"name": row.name, "bf16": row.bf16, "tok_s": row.tok_s, "val_loss": row.val_loss(val_b),
                "mfu": row.tok_s * fpt / peak[row.bf16] if peak else None} for row in rows]

    base = results[0]["tok_s"]
    hf = {r["bf16"]: r["tok_s"] for r in results if r["name"].startswith("hf-")}
    fp32_val = results[1]["val_loss"]
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"\npreset={args.preset} params={n_params / 1e6:.2f}M batch={args.batch}x{args.seq} steps={args.steps} "
          f"(+{args.warmup} warm-up) clock={args.clock} threads={torch.get_num_threads()}\n"
          f"load average (1/5/15 min) at the end: {load}\ndata={'tokens ' + str(tokens_dir) if tokens_dir else 'random'}")
    if peak:
        print(f"matmul peak: fp32 {peak[False] / 1e9:.0f} GFLOP/s, bf16 {peak[True] / 1e9:.0f} GFLOP/s")
    print("\n| run | tokens/s | vs hf-fp32 | vs hf, same precision | MFU | val loss | val loss vs ours-fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['name']} | {r['tok_s']:,.0f} | {r['tok_s'] / base:.2f}x | {r['tok_s'] / hf[r['bf16']]:.2f}x | "
              f"{'—' if r['mfu'] is None else format(r['mfu'], '.0%')} | {r['val_loss']:.4f} | "
              f"{(r['val_loss'] / fp32_val - 1) * 100:+.2f}% |")


if __name__ == "__main__":
    main()
