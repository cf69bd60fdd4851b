"""One training loop for pretraining and chat fine-tuning, on Hugging Face Accelerate.

- AdamW (no decay on norms), linear warmup then cosine to `lr * min_lr_ratio`; the learning rate is a
  pure function of the step, so there is no scheduler state to lose
- gradient accumulation, gradient clipping, bf16 autocast (CPU AVX-512 BF16 or GPU), optional
  torch.compile; DDP via `accelerate launch` (FSDP with `distributed=fsdp`, meant for GPU clusters)
- batches come from a `BatchSource` (see token_data.TokenShards) addressed by (step, micro, rank), so
  `resume=True` continues exactly where the last checkpoint left off
- the loss is a parameter (`lm_loss` by default; source/dpo.py passes DPO's, whose extra scalars are logged)
- progress bar with loss, tokens/s, MFU and ETA; metrics appended to `metrics.jsonl`; periodic val
  loss and bits-per-byte; atomic checkpoints every `checkpoint_every` steps and at the end

Output folder: `model.pth` (weights, see checkpoint.py), `train_state.pt`, `metrics.jsonl`, `run.json`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Protocol

import torch

from source.checkpoint import (CheckpointError, atomic_torch_save, check_same_save, load_model, model_from_checkpoint,
                               new_save_id, read_checkpoint, read_train_state, save_model)
from source.files import atomic_write_bytes
from source.config import ModelConfig, TrainConfig, config_dict
from source.lora import apply_lora, load_lora_state, lora_state_dict, merged_copy
from source.model import Transformer


class BatchSource(Protocol):
    tokens_per_byte: float  # 0: no bits-per-byte reading of the val loss (preference pairs)

    def batch(self, split: str, batch_size: int, seq_len: int, step: int, micro: int = 0,
              rank: int = 0) -> tuple[torch.Tensor, ...]: ...


def lm_loss(model: torch.nn.Module, batch: tuple, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token loss of an (x, y[, mask]) batch (pretraining, SFT), with no extra scalars."""
    x, y, *mask = batch
    _, loss = model(x.to(device), y.to(device), loss_mask=mask[0].to(device) if mask else None)
    return loss, {}


@dataclass
class TrainResult:
    step: int
    tokens: int
    seconds: float
    final_loss: float
    val_loss: float | None
    val_bpb: float | None
    out_dir: str


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus the attention scores (PaLM appendix B)."""
    return 6 * n_params + 12 * cfg.n_layers * cfg.dim * seq_len


def measure_peak_flops(dtype: torch.dtype, size: int = 1024, repeats: int = 8, trials: int = 3,
                       device: str | torch.device = "cpu") -> float:
    """Dense matmul throughput of the device that trains: the denominator of MFU. Best of a few trials,
    so a momentary background load does not deflate it (and inflate MFU)."""
    device = torch.device(device)
    if device.type == "cuda":
        size, repeats = 8192, 20  # small products cannot fill a datacenter GPU
    a, b = torch.randn(size, size, dtype=dtype, device=device), torch.randn(size, size, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up
    sync()
    best = 0.0
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync()
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - t0))
    return best


def cpu_has_bf16_units(cpuinfo: str | None = None) -> bool | None:
    """Whether an x86 CPU lists AVX512-BF16 or AMX-BF16 in /proc/cpuinfo; None where there is no such
    list to read (other systems, other architectures)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return None
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), None)
    if flags is None or "sse2" not in flags:  # not an x86 flag list
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.lru_cache(maxsize=1)
def slow_cpu_bf16(size: int = 256, trials: int = 9) -> tuple[bool, float, float]:
    """(is bf16 much slower than fp32 here?, bf16 GFLOP/s, fp32 GFLOP/s) for CPU matmuls. CPUs without
    AVX512-BF16/AMX emulate bf16, tens of times slower than fp32, so bf16 autocast made a training step
    minutes long instead of seconds. An x86 CPU without those flags is slow, whatever the timing says: a
    timed probe alone once chose bf16 on such a CPU, as load from other processes can slow a trial a
    hundredfold. Elsewhere the timing decides; the dtypes take turns and each speed is its best trial.
    Cached: one process picks one precision."""
    mats = {dtype: torch.randn(size, size, dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(mats, float("inf"))
    for a in mats.values():
        a @ a  # warm-up
    for _ in range(trials):
        for dtype, a in mats.items():
            t0 = time.perf_counter()
            a @ a
            best[dtype] = min(best[dtype], time.perf_counter() - t0)
    bf16, fp32 = (2 * size**3 / best[d] / 1e9 for d in (torch.bfloat16, torch.float32))
    return cpu_has_bf16_units() is False or bf16 < 0.5 * fp32, bf16, fp32


def budgeted_max_steps(cfg: TrainConfig, step: int, seconds_per_step: float, seconds_left: float) -> int:
    """The step count that fits a wall-clock budget, never more than the configured max_steps. Evaluation
    passes cost about `eval_batches` forward passes each, a third of a training step per batch."""
    evals_per_step = cfg.eval_batches / 3 / cfg.grad_accum / max(1, cfg.eval_every)
    fits = int(seconds_left / (seconds_per_step * (1 + evals_per_step)))
    return max(step + 1, min(cfg.max_steps, step + fits))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def process_state():
    """The process group this run belongs to. `cpu=True` matters: without it a CPU-only torchrun/
    `accelerate launch --multi_gpu` job would not form a gloo group and each process would train alone."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    kwargs = {}
    if cfg.distributed == "fsdp":
        from accelerate import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin()
    from accelerate.state import AcceleratorState

    mixed_precision = "bf16" if cfg.precision == "bf16" else "no"
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed_precision and os.environ.get("WORLD_SIZE", "1") == "1":
        # accelerate keeps one AcceleratorState per process and refuses a second precision; a single
        # process that trains twice (the test suite, `builder release`) may need both. Launched
        # multi-process jobs never change precision mid-run, so they keep the guard.
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(), **kwargs)


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, keep_until_step: int) -> None:
    """Drop log lines a killed run wrote after its last checkpoint, so the resumed log has no repeats."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= keep_until_step]
    atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, data: BatchSource, cfg: TrainConfig, accelerator, rank: int = 0,
                  loss_fn: Callable[..., tuple] = lm_loss) -> float:
    model.eval()
    losses = []
    for i in range(cfg.eval_batches):
        batch = data.batch("val", cfg.batch_size, cfg.seq_len, step=i, rank=rank)
        with accelerator.autocast():
            loss, _ = loss_fn(model, batch, accelerator.device)
        losses.append(loss.float())
    model.train()
    mean = torch.stack(losses).mean().to(accelerator.device)
    return accelerator.reduce(mean, reduction="mean").item()


def read_run_info(out_dir: Path) -> dict:
    """run.json of a run folder ({} when there is none); a damaged one is a CheckpointError naming it."""
    path = Path(out_dir) / "run.json"
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc}); restore it or train again without --resume") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(info).__name__}")
    return info


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, data: BatchSource, out_dir: str | Path, *,
          tokenizer_sha256: str, kind: str = "pretrain", resume: bool = False, init_from: str | Path | None = None,
          metadata: dict | None = None, progress: bool = True, lora_rank: int = 0, lora_alpha: float = 16.0,
          on_log: Callable[[dict], None] | None = None, time_budget_s: float | None = None,
          loss_fn: Callable[..., tuple] = lm_loss, init_model: Callable[[], Transformer] | None = None) -> TrainResult:
    """Train `model_cfg` on `data`, writing checkpoints and logs to `out_dir`.

    `init_from` starts from another run's `model.pth` (SFT starts from the pretrained model);
    `resume` continues this folder's own run from `train_state.pt`. `lora_rank > 0` trains LoRA
    adapters on a frozen `init_from` model; the saved `model.pth` has them merged in. `init_model` builds the
    starting model instead of `init_from` (an imported Hugging Face base, source.base_model).

    `time_budget_s` fits the run to a wall-clock budget (a lent GPU for a few minutes): after a few timed
    steps, max_steps is lowered to what fits, before the cosine schedule depends on it, and the new value
    is what run.json and the checkpoint record. A resumed run keeps the max_steps it was started with."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    probe = None
    if train_cfg.precision == "bf16" and not torch.cuda.is_available():
        slow, bf16_gflops, fp32_gflops = slow_cpu_bf16()
        probe = {"bf16_gflops": round(bf16_gflops, 2), "fp32_gflops": round(fp32_gflops, 2),
                 "chose": "fp32" if slow else "bf16"}  # in run.json, so a surprising choice can be checked
        if slow:
            train_cfg = replace(train_cfg, precision="fp32")
            if os.environ.get("RANK", "0") == "0":
                print(f"note: this CPU has no fast bf16 (matmul {bf16_gflops:.1f} GFLOP/s vs {fp32_gflops:.1f} "
                      "in fp32): training in fp32; --set precision=fp32 skips this check", flush=True)
    accelerator = _accelerator(train_cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.device.type == "cpu" and world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    main = accelerator.is_main_process
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path, state_path = out_dir / "metrics.jsonl", out_dir / "train_state.pt"

    if resume and not (state_path.is_file() and (out_dir / "model.pth").is_file()):
        raise FileNotFoundError(f"{out_dir}: nothing to resume (need model.pth and train_state.pt)")
    if lora_rank and init_from is None and init_model is None:
        raise ValueError("LoRA fine-tunes an existing model: pass init_from (the base model.pth)")
    torch.manual_seed(train_cfg.seed)
    if resume:  # before any model is built: weights and optimizer state must come from one save
        state, saved = read_train_state(state_path), read_checkpoint(out_dir / "model.pth")
        check_same_save(saved, state, out_dir)
    if resume and not lora_rank:  # LoRA resumes from the frozen base plus the saved adapters
        model = model_from_checkpoint(saved)
    elif init_model is not None:
        model = init_model()
    elif init_from is not None:
        model, _ = load_model(init_from)
    else:
        model = Transformer(model_cfg)
    model_cfg = model.cfg  # a parent checkpoint's architecture wins: it is what the weights are
    if lora_rank:
        model = apply_lora(model, lora_rank, lora_alpha)
    optimizer = make_optimizer(model, train_cfg)
    step, tokens_seen, elapsed = 0, 0, 0.0
    if resume:
        if lora_rank and "lora" not in state:
            raise CheckpointError(f"{state_path}: no LoRA adapters in this training state (a full fine-tune's?): "
                                  "resume it without --lora, or train again without --resume")
        optimizer.load_state_dict(state["optimizer"])
        if lora_rank:
            load_lora_state(model, state["lora"])
        step, tokens_seen, elapsed = state["step"], state["tokens"], state["elapsed"]
        started = read_run_info(out_dir)
        if started.get("time_budget_s"):  # the fitted step count, not the preset's, ends the schedule
            train_cfg = replace(train_cfg, max_steps=started["train"]["max_steps"])
            time_budget_s = started["time_budget_s"]  # run.json is rewritten below: keep the record for the next resume
        torch.set_rng_state(state["torch_rng"])
        if main:
            _truncate_metrics(metrics_path, step)
    elif main and metrics_path.exists():
        metrics_path.unlink()  # a fresh run starts a fresh log
    accelerator.wait_for_everyone()

    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    compiled = torch.compile(model) if train_cfg.compile else model
    compiled, optimizer = accelerator.prepare(compiled, optimizer)
    if main:
        run_info = {"kind": kind, "model": config_dict(model_cfg), "train": asdict(train_cfg), "params": n_params,
                    "trainable_params": n_trainable, "lora_rank": lora_rank, "processes": world,
                    "device": str(accelerator.device), "tokenizer_sha256": tokenizer_sha256,
                    "time_budget_s": time_budget_s, "cpu_precision_probe": probe, **(metadata or {})}
        atomic_write_bytes(out_dir / "run.json", json.dumps(run_info, indent=2).encode())

    peak_dtype = torch.bfloat16 if train_cfg.precision == "bf16" else torch.float32
    peak = measure_peak_flops(peak_dtype, device=accelerator.device)
    fpt = flops_per_token(model_cfg, n_params, train_cfg.seq_len)
    save_meta = dict(metadata or {}, params=sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name))

    def save(current_step: int) -> None:
        accelerator.wait_for_everyone()
        if main:
            weights, save_id = merged_copy(model) if lora_rank else model, new_save_id(current_step)
            save_model(out_dir / "model.pth", weights, tokenizer_sha256, kind=kind, step=current_step,
                       tokens=tokens_seen, train_config=asdict(train_cfg), save_id=save_id, **save_meta)
            state = {"optimizer": optimizer.state_dict(), "step": current_step, "tokens": tokens_seen,
                     "elapsed": elapsed, "torch_rng": torch.get_rng_state(), "save_id": save_id}
            if lora_rank:
                state["lora"] = lora_state_dict(model)
            atomic_torch_save(state, state_path)
        accelerator.wait_for_everyone()

    compiled.train()
    loss_val = float("nan")
    val_loss = val_bpb = None
    bar = tqdm(total=train_cfg.max_steps, initial=step, desc=kind, unit="step", disable=not (progress and main),
               dynamic_ncols=True)
    window_t0, window_tokens = time.perf_counter(), 0
    budget_t0, calibrate_from, calibrate_to = time.perf_counter(), step + 5, step + 25  # skip warm-up steps
    while step < train_cfg.max_steps:
        if time_budget_s and not resume and step in (calibrate_from, calibrate_to):
            accelerator.wait_for_everyone()  # every process times the same steps
            if step == calibrate_from:
                calibrate_t0 = time.perf_counter()
            else:
                per_step = (time.perf_counter() - calibrate_t0) / (calibrate_to - calibrate_from)
                seconds_left = time_budget_s - (time.perf_counter() - budget_t0)
                fitted = budgeted_max_steps(train_cfg, step, per_step, seconds_left)
                if fitted != train_cfg.max_steps:
                    train_cfg = replace(train_cfg, max_steps=fitted)
                    bar.total = fitted
                    if main:
                        bar.write(f"time budget {time_budget_s:.0f} s at {per_step * 1000:.1f} ms/step: "
                                  f"max_steps -> {fitted}")
                        run_info["train"] = asdict(train_cfg)
                        atomic_write_bytes(out_dir / "run.json", json.dumps(run_info, indent=2).encode())
        t_step = time.perf_counter()
        lr = lr_at(step, train_cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=accelerator.device)
        extras: dict[str, torch.Tensor] = {}
        step_tokens = 0
        for micro in range(train_cfg.grad_accum):
            batch = data.batch("train", train_cfg.batch_size, train_cfg.seq_len, step, micro, rank)
            step_tokens += batch[0].numel()
            last = micro == train_cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last else accelerator.no_sync(compiled)
            with sync:
                with accelerator.autocast():
                    loss, stats = loss_fn(compiled, batch, accelerator.device)
                accelerator.backward(loss / train_cfg.grad_accum)
            total += loss.detach() / train_cfg.grad_accum
            extras = {k: extras.get(k, 0) + v.detach().float() / train_cfg.grad_accum for k, v in stats.items()}
        grad_norm = accelerator.clip_grad_norm_(compiled.parameters(), train_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += step_tokens * world  # SFT batches are padded to their longest chat, not seq_len
        window_tokens += step_tokens * world
        elapsed += time.perf_counter() - t_step

        if step % train_cfg.log_every == 0 or step == train_cfg.max_steps:
            loss_val = accelerator.reduce(total, reduction="mean").item()
            dt = time.perf_counter() - window_t0
            tok_s = window_tokens / dt
            if tok_s * fpt > peak:  # the peak was measured while other work shared the cores: measure again
                peak = max(peak, measure_peak_flops(peak_dtype, device=accelerator.device))
            record = {"step": step, "loss": round(loss_val, 6), "lr": lr, "grad_norm": round(float(grad_norm), 4),
                      "tokens": tokens_seen, "tok_per_s": round(tok_s, 1), "mfu": round(tok_s * fpt / peak, 4),
                      "elapsed": round(elapsed, 2),
                      **{name: round(accelerator.reduce(v, reduction="mean").item(), 6) for name, v in extras.items()}}
            window_t0, window_tokens = time.perf_counter(), 0
            if main:
                _append_jsonl(metrics_path, record)
                bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tok_s:,.0f}", mfu=f"{record['mfu']:.1%}")
                if on_log:
                    on_log(record)
        if step % train_cfg.eval_every == 0 or step == train_cfg.max_steps:
            val_loss = evaluate_loss(compiled, data, train_cfg, accelerator, rank, loss_fn)
            val_bpb = val_loss / math.log(2) * data.tokens_per_byte if data.tokens_per_byte else None
            if main:
                bpb = {"val_bpb": round(val_bpb, 6)} if val_bpb is not None else {}  # none for preference pairs
                _append_jsonl(metrics_path, {"step": step, "val_loss": round(val_loss, 6), **bpb})
                bar.write(f"step {step}: val loss {val_loss:.4f}" + (f", val bits/byte {val_bpb:.4f}" if bpb else ""))
            window_t0 = time.perf_counter()  # evaluation time is not training throughput
        if step % train_cfg.checkpoint_every == 0 or step == train_cfg.max_steps:
            save(step)
            window_t0 = time.perf_counter()
        bar.update(1)
    bar.close()
    accelerator.end_training()
    return TrainResult(step=step, tokens=tokens_seen, seconds=round(elapsed, 2), final_loss=loss_val,
                       val_loss=val_loss, val_bpb=val_bpb, out_dir=str(out_dir))
