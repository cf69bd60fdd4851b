"""Decode speed at batch 1: our ChatBackends vs Hugging Face `LlamaForCausalLM.generate()`, same weights.

    python benchmarks/decode.py [--checkpoint runs/base-small/model.pth] [--preset small]
                                [--prompt-tokens 64] [--new-tokens 128] [--threads 1] [--compile]
                                [--onnx dist/export] [--gguf FILE] [--clock wall|cpu]

Rows, measured one after another in this one process, on the same prompt:
- `hf-generate`: transformers' LlamaForCausalLM (fp32, its default sdpa attention), our weights
  converted with `source.model.hf_state_dict`/`hf_config_dict`, greedy, `min_new_tokens` = `max_new_tokens`
- `ours-fp32`, `ours-bf16`, `ours-int8`: `TorchBackend` prefill + one `decode` per token, greedy through
  `sample_next` (the chat engine's own loop minus detokenizing); `--compile` adds `+compile` rows
- `onnx-fp32-gqa`: `OnnxBackend.from_model`, the GroupQueryAttention graph built in memory from the same
  fp32 weights with a shared KV buffer (what `supermix chat|ask` run for a .pth by default), same loop
- `onnx-fp32`, `onnx-int8`, `onnx-int8-gqa` (the GroupQueryAttention graph, onnx/model_gqa_quantized.onnx):
  `OnnxBackend` over the export folder `--onnx` (default dist/export when it exists; it must hold the
  same weights as --checkpoint: `builder export --model X` of that checkpoint), same loop
- `llama.cpp-fp32 (N threads)`: llama-cpp-python (the `llama-cpp` extra, compiled from its source package) on the
  f32 GGUF of the same weights (`builder.gguf.write_gguf`, written to a temporary folder; `--gguf FILE` to
  use another), prefill + one `eval` per token, argmax over `llama_get_logits`, same loop; 1 and 2 threads
  (only `--threads` when given); skipped with a note when `llama_cpp` is not importable or the weights have
  no tokenizer
Each row: tokens/s over the whole generation (prompt prefill + new tokens, the median of `--repeats`
timed runs after one warm-up), ms per token, the ratio to hf-generate, how many of the new tokens
equal HF's greedy tokens (fp32 must match all; bf16/int8 drift by design), and decode tokens/s after the
prefill (HF: the whole run minus a 1-token generate), which `--prompt-tokens 500` compares with a short
prompt's. Target: ours >= 10x HF.
Weights: `--checkpoint` (default runs/base-small/model.pth when it exists), else a random `--preset`
init (speed does not depend on the weights). The load average is printed: numbers taken while
something else runs (a training job) are low and noisy, and the table says so; `--clock cpu --threads 1`
times this process' CPU seconds instead, which a busy second core moves less (not its memory traffic).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script from anywhere

from runtime_python.backends import ChatBackend, TorchBackend, default_tokenizer_dir  # noqa: E402
from runtime_python.generation import GenerationConfig, sample_next  # noqa: E402
from source.checkpoint import load_model  # noqa: E402
from source.config import model_config  # noqa: E402
from source.model import Transformer, hf_config_dict, hf_state_dict  # noqa: E402
from source.tokenizer import Tokenizer  # noqa: E402

GREEDY = GenerationConfig(temperature=0.0)
PROMPT_TEXT = ("Serialize obj as a JSON formatted stream to fp (a .write()-supporting file-like object). "
               "If skipkeys is true then dict keys that are not basic types will be skipped instead of "
               "raising a TypeError. If ensure_ascii is false, the output may contain non-ASCII characters. ")


def load(args) -> tuple[Transformer, Tokenizer | None, str]:
    ckpt = Path(args.checkpoint) if args.checkpoint else Path("runs/base-small/model.pth")
    if ckpt.is_file():
        model, _ = load_model(ckpt)
        try:
            tok = Tokenizer.load(default_tokenizer_dir(ckpt))
        except FileNotFoundError:
            tok = None
        return model, tok, str(ckpt)
    if args.checkpoint:
        raise SystemExit(f"{ckpt}: not found")
    torch.manual_seed(0)
    return Transformer(model_config(args.preset)), None, f"random init, preset {args.preset}"


def prompt_ids(tok: Tokenizer | None, vocab: int, n: int) -> list[int]:
    if tok is not None:
        ids = tok.encode(PROMPT_TEXT * (1 + n // 20))
        return [tok.bos_id] + ids[:n - 1]
    return torch.randint(8, vocab, (n,), generator=torch.Generator().manual_seed(0)).tolist()


@torch.inference_mode()  # the backend's logits are inference tensors: editable in place only in here
def ours(backend: ChatBackend, prompt: list[int], n: int, eos: int,
         clock=time.perf_counter) -> tuple[list[int], float, float]:
    """Greedy tokens, the seconds the prefill took, the seconds in all."""
    out: list[int] = []
    backend.prefill([0])  # untimed: a backend that keeps the last prompt's K/V then runs this one whole, as HF does
    t0 = clock()
    logits = backend.prefill(prompt)
    prefill = clock() - t0
    for i in range(n):
        logits[eos] = float("-inf")  # as HF's min_new_tokens does, so both runs stay comparable
        out.append(sample_next(logits, GREEDY, out))
        if i + 1 < n:
            logits = backend.decode(out[-1])
    return out, prefill, clock() - t0


class LlamaCpp:
    """llama-cpp-python on a GGUF file, behind the prefill/decode half of the ChatBackend protocol."""

    def __init__(self, path: Path, n_ctx: int, threads: int) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def _logits(self) -> torch.Tensor:  # the last evaluated position's row (llama.cpp keeps only that one)
        row = self._lib.llama_get_logits(self.llm.ctx)
        return torch.from_numpy(np.ctypeslib.as_array(row, shape=(self.n_vocab,)).copy())

    def prefill(self, ids: list[int]) -> torch.Tensor:
        self.llm.reset()  # the next eval drops the cached K/V past position 0
        self.llm.eval(ids)
        return self._logits()

    def decode(self, token_id: int) -> torch.Tensor:
        self.llm.eval([token_id])
        return self._logits()

    def release(self) -> None:
        self.llm.close()


def llama_cpp_rows(args, model: Transformer, tok: Tokenizer | None, tmp: Path) -> list[tuple[str, Path, int]]:
    """(row name, GGUF file, threads) for the llama.cpp rows, or [] with a note saying why there are none."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("no llama.cpp rows: llama_cpp is not importable (pip install -e '.[llama-cpp]'; it compiles llama.cpp)")
        return []
    if args.gguf:
        path = Path(args.gguf)
    elif tok is None:
        print("no llama.cpp rows: the weights have no tokenizer to write a GGUF with (pass --checkpoint or --gguf)")
        return []
    else:
        from builder.gguf import write_gguf

        path = tmp / "model-f32.gguf"
        write_gguf(model, tok, path, "f32")
    return [(f"llama.cpp-fp32 ({t} thread{'s' * (t > 1)})", path, t) for t in ([args.threads] if args.threads else [1, 2])]


def hf_model(model: Transformer):
    from transformers import LlamaConfig, LlamaForCausalLM

    skip = ("architectures", "model_type", "torch_dtype")
    fields = {k: v for k, v in hf_config_dict(model.cfg).items() if k not in skip}
    hf = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    hf.load_state_dict(hf_state_dict(model))
    hf.generation_config.pad_token_id = hf.generation_config.eos_token_id
    return hf


def timed(fn, repeats: int) -> tuple[float, list[int], float]:
    """fn() -> (tokens, prefill seconds, seconds): median seconds, the tokens, median seconds after the prefill."""
    fn()  # warm-up (and, with --compile, the compilation)
    times, after, out = [], [], []
    for _ in range(repeats):
        out, prefill, seconds = fn()
        times.append(seconds)
        after.append(seconds - prefill)
    return statistics.median(times), out, statistics.median(after)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads for every row")
    ap.add_argument("--dtypes", default="fp32,bf16,int8")
    ap.add_argument("--compile", action="store_true", help="add torch.compile rows (slow to compile)")
    ap.add_argument("--onnx", default="dist/export", help="export folder for the onnx rows (skipped if missing)")
    ap.add_argument("--gguf", default=None, help="GGUF file for the llama.cpp rows [default: the f32 GGUF of the "
                    "same weights, written to a temporary folder]")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="time by the wall clock or by this process' CPU time (use with --threads 1)")
    args = ap.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, origin = load(args)
    model.eval()
    prompt = prompt_ids(tok, model.cfg.vocab_size, args.prompt_tokens)
    n, eos = args.new_tokens, 2
    load_before = os.getloadavg()[0]
    print(f"weights: {origin} ({model.num_params() / 1e6:.1f}M params); prompt {len(prompt)} tokens, "
          f"{n} new tokens, greedy, batch 1; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.clock} clock")

    rows = []
    hf = hf_model(model)
    x = torch.tensor([prompt])

    def hf_run(new: int) -> tuple[list[int], float, float]:
        t0 = clock()
        with torch.inference_mode():
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False)
        return out[0, len(prompt):].tolist(), 0.0, clock() - t0

    hf_prefill = timed(lambda: hf_run(1), args.repeats)[0]
    hf_s, hf_tokens, _ = timed(lambda: hf_run(n), args.repeats)
    rows.append(("hf-generate", "fp32", hf_s, hf_tokens, None, hf_s - hf_prefill))
    del hf
    variants = [(d, False) for d in args.dtypes.split(",")] + ([(d, True) for d in args.dtypes.split(",")]
                                                               if args.compile else [])
    for dtype, compiled in variants:
        name = f"ours-{dtype}" + ("+compile" if compiled else "")
        try:
            backend = TorchBackend(model, tok, dtype=dtype, compile=compiled)
            t0 = time.perf_counter()
            backend.prefill(prompt)
            backend.decode(prompt[-1])  # the first decode compiles
            first = time.perf_counter() - t0
            s, tokens, after = timed(lambda: ours(backend, prompt, n, eos, clock), args.repeats)
        except Exception as e:  # e.g. no C++ compiler for inductor, or no int8 kernel on this CPU
            print(f"{name}: failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            continue
        rows.append((name, dtype, s, tokens, first if compiled else None, after))
        backend.release()
    from runtime_python.onnx_backend import ONNX_FILES, OnnxBackend

    backend = OnnxBackend.from_model(model, tok, threads=args.threads or 1)
    s, tokens, after = timed(lambda: ours(backend, prompt, n, eos, clock), args.repeats)
    rows.append(("onnx-fp32-gqa", "fp32", s, tokens, None, after))
    backend.release()
    if (Path(args.onnx) / "onnx" / "model.onnx").is_file():
        for dtype in ("fp32", "q8", "q8-gqa"):
            if not (Path(args.onnx) / "onnx" / ONNX_FILES[dtype]).is_file():
                continue
            backend = OnnxBackend(args.onnx, dtype, threads=args.threads or 1)
            s, tokens, after = timed(lambda: ours(backend, prompt, n, eos, clock), args.repeats)
            rows.append((f"onnx-{dtype.replace('q8', 'int8')}", dtype, s, tokens, None, after))
    else:
        print(f"no ONNX rows: {args.onnx}/onnx/model.onnx not found (builder export --out {args.onnx})")
    with tempfile.TemporaryDirectory() as tmp:
        for name, path, threads in llama_cpp_rows(args, model, tok, Path(tmp)):
            backend = LlamaCpp(path, model.cfg.max_seq_len, threads)
            s, tokens, after = timed(lambda: ours(backend, prompt, n, eos, clock), args.repeats)
            rows.append((name, "fp32", s, tokens, None, after))
            backend.release()

    print()
    print("| engine | weights | tok/s | ms/token | vs hf-generate | tokens equal to HF | decode tok/s after prefill |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, dtype, s, tokens, first, after in rows:
        same = next((i for i, (a, b) in enumerate(zip(tokens, hf_tokens)) if a != b), len(tokens))
        note = f" (compile {first:.0f} s)" if first else ""
        print(f"| {name}{note} | {dtype} | {n / s:.0f} | {s / n * 1e3:.2f} | {hf_s / s:.1f}x | {same}/{n} "
              f"| {(n - 1) / after:.0f} |")
    load_after = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    print(f"\nload average {load_before:.1f} before, {load_after:.1f} after, {cores} cores", end="")
    busy = max(load_before, load_after) > cores / 2
    print(": BUSY machine, numbers are low and noisy; re-run on a quiet one." if busy else ": quiet machine.")


if __name__ == "__main__":
    main()
