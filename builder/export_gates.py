"""The export's gates: each compares an exported file with the PyTorch model it came from.

A gate is {"name", "passed" (True/False/None = skipped), "required", "value", "threshold", "detail"}.
Required gates that fail stop the export (`GateError`); the others are reported (q4, int8 greedy
agreement, whose target the issue states as a report). Prompts are real chat prompts built by
`source.prompt.build_prompt`, the one prompt builder (system prompt, a numbered context passage, the
question), so the gates exercise exactly what `supermix` and the site send. They take any `ChatTokenizer`:
ours, or an imported base's tokenizer.json and chat template (the chat-template gate then compares
transformers' `apply_chat_template` with our rendering of the model's own template).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from runtime_python.onnx_backend import OnnxBackend
from source.evaluate import SAMPLE_PROMPTS
from source.model import Transformer
from source.prompt import build_prompt
from source.sft_data import DEFAULT_SYSTEM_PROMPT
from source.tokenizer import ChatTokenizer

GREEDY_TOKENS = 64
LOGIT_TOLERANCE = 1e-4
INT8_BPB_TOLERANCE = 0.01  # relative
INT8_SIZE_RATIO = 0.30
AGREEMENT_TARGET = 0.90
BPB_WINDOWS, BPB_WINDOW = 16, 256
CONTEXT = {"id": "gate:json.dumps", "title": "json.dumps",
           "text": "json.dumps(obj) serializes obj to a JSON formatted str."}


class GateError(RuntimeError):
    def __init__(self, failed: list[dict], folder: Path) -> None:
        lines = [f"  {g['name']}: {g['value']} (needs {g['threshold']}) {g.get('detail', '')}".rstrip() for g in failed]
        super().__init__("export gates failed; nothing was published (inspect " + str(folder) + "):\n" + "\n".join(lines))
        self.failed, self.folder = failed, folder


def gate(name: str, passed: bool | None, value, threshold: str, detail: str = "", required: bool = True) -> dict:
    return {"name": name, "passed": None if passed is None else bool(passed), "required": required, "value": value, "threshold": threshold,
            "detail": detail}


def gate_prompts(tokenizer: ChatTokenizer, max_seq_len: int) -> list[list[int]]:
    prompts = []
    for i, question in enumerate(SAMPLE_PROMPTS):
        passages = [CONTEXT] if i % 2 == 0 else []
        prompts.append(build_prompt(tokenizer, [{"role": "user", "content": question}], passages,
                                    DEFAULT_SYSTEM_PROMPT, GREEDY_TOKENS, max_seq_len).ids)
    return prompts


def torch_greedy(model: Transformer, prompts: list[list[int]], stop_ids: tuple[int, ...] = ()) -> list[list[int]]:
    return [model.generate(ids, GREEDY_TOKENS, stop_ids=stop_ids) for ids in prompts]


def _windows(tokenizer: ChatTokenizer, token_dir: str | Path | None) -> tuple[list[np.ndarray], float, str]:
    """Evaluation windows of BPB_WINDOW + 1 tokens, tokens per byte, and where they come from."""
    if token_dir is not None and (Path(token_dir) / "val.bin").is_file():
        from source.token_data import TokenShards

        shards = TokenShards(token_dir)
        data = shards.splits["val"]
        n = min(BPB_WINDOWS, (len(data) - 1) // BPB_WINDOW)
        if n >= 1:
            windows = [np.asarray(data[r * BPB_WINDOW: r * BPB_WINDOW + BPB_WINDOW + 1], dtype=np.int64) for r in range(n)]
            return windows, shards.tokens_per_byte, f"val split of {token_dir}"
    # always present: the stdlib's pydoc topics (part of the training corpus, fine for an fp32-vs-int8 delta)
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))[:200_000]
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    tokens_per_byte = len(ids) / len(text.encode("utf-8"))
    n = min(BPB_WINDOWS, (len(ids) - 1) // BPB_WINDOW)
    windows = [ids[r * BPB_WINDOW: r * BPB_WINDOW + BPB_WINDOW + 1] for r in range(n)]
    return windows, tokens_per_byte, "pydoc_data topics (stdlib)"


def onnx_bpb(backend: OnnxBackend, windows: list[np.ndarray], tokens_per_byte: float) -> float:
    session = backend.session
    empty = np.zeros(backend.kv_shape, dtype=np.float32)
    nats, count = 0.0, 0
    for w in windows:
        feeds = {"input_ids": w[None, :-1], "attention_mask": np.ones((1, len(w) - 1), np.int64),
                 "position_ids": np.arange(len(w) - 1, dtype=np.int64)[None]}
        feeds.update({name: empty for name in backend._past_names})
        logits = session.run(["logits"], feeds)[0][0].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nats -= logp[np.arange(len(w) - 1), w[1:]].sum()
        count += len(w) - 1
    return nats / count / math.log(2) * tokens_per_byte


def decode_speed(backend, prompt: list[int], n: int = GREEDY_TOKENS, repeats: int = 3) -> float:
    """Decode tokens/s after the prefill (best of `repeats`)."""
    best = float("inf")
    for _ in range(repeats):
        logits = backend.prefill(prompt)
        t0 = time.perf_counter()
        for _ in range(n):
            logits = backend.decode(int(logits.argmax()))
        best = min(best, time.perf_counter() - t0)
    return round(n / best, 1)


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def hf_gates(folder: Path, model: Transformer, tokenizer: ChatTokenizer, prompts: list[list[int]],
             reference: list[list[int]]) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(folder)
    worst, same = 0.0, 0
    with torch.no_grad():
        for ids, ref in zip(prompts, reference):
            seq = torch.tensor([ids + ref])
            ours, _ = model(seq)
            theirs = hf(seq).logits
            worst = max(worst, float((ours - theirs).abs().max()))
            predicted = theirs[0, len(ids) - 1:-1].argmax(-1).tolist()  # teacher-forced greedy
            same += predicted == ref
    messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": SAMPLE_PROMPTS[0]}]
    templ = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ours_ids, _ = tokenizer.encode_chat(messages)
    return [gate("HF AutoModelForCausalLM logits", worst < LOGIT_TOLERANCE, f"{worst:.1e}", f"< {LOGIT_TOLERANCE:g}"),
            gate("HF greedy tokens == ours", same == len(prompts), f"{same}/{len(prompts)} prompts", "all"),
            gate("HF AutoTokenizer chat template == ours", list(templ) == ours_ids,
                 "identical" if list(templ) == ours_ids else "differs", "identical ids")]


def optimum_gate(folder: Path, prompts: list[list[int]], reference: list[list[int]],
                 stop_ids: tuple[int, ...]) -> dict:
    name = "optimum ORTModelForCausalLM generate == ours"
    try:
        from optimum.onnxruntime import ORTModelForCausalLM
    except ImportError:
        return gate(name, None, "skipped", "all", "optimum-onnx not installed (it is in the [dev] extra)",
                    required=False)
    import json

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("head_dim", 0) * config["num_attention_heads"] != config["hidden_size"]:
        # optimum-onnx 0.1.0 sizes the empty KV cache of a llama/qwen2 graph as hidden_size / heads, whatever
        # head_dim says: it cannot run such a model (transformers.js and onnxruntime take head_dim)
        return gate(name, None, "skipped", "all", f"head_dim {config.get('head_dim')} != hidden_size / heads, which "
                    "optimum-onnx assumes", required=False)
    ort_model = ORTModelForCausalLM.from_pretrained(folder, file_name="model.onnx", subfolder="onnx", use_cache=True,
                                                    use_io_binding=False)
    from transformers import GenerationConfig

    # with subfolder="onnx", optimum looks for generation_config.json beside the .onnx file: load ours
    generation = GenerationConfig.from_pretrained(folder)
    same = 0
    for ids, ref in zip(prompts, reference):
        out = ort_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 generation_config=generation, max_new_tokens=GREEDY_TOKENS, do_sample=False)
        tokens = out[0, len(ids):].tolist()
        same += (tokens[:-1] if tokens and tokens[-1] in stop_ids else tokens) == ref  # generate keeps the eos
    return gate(name, same == len(prompts), f"{same}/{len(prompts)} prompts", "all", "stops at generation_config eos")


def run_gates(model: Transformer, tokenizer: ChatTokenizer, folder: Path, token_dir=None, log=print) -> tuple[list[dict], dict, dict]:
    """All gates over an export folder; (gates, decode tokens/s, bits/byte and sizes per file)."""
    from runtime_python.backends import TorchBackend

    prompts = gate_prompts(tokenizer, model.cfg.max_seq_len)
    reference = torch_greedy(model, prompts)
    from builder.export_hf import stop_ids

    stops = tuple(stop_ids(tokenizer))
    gates: list[dict] = []
    log("export: gates: onnx fp32 parity ...")
    fp32 = OnnxBackend(folder, "fp32")
    same = sum(fp32.greedy(ids, GREEDY_TOKENS) == ref for ids, ref in zip(prompts, reference))
    gates.append(gate(f"ONNX fp32 greedy == PyTorch ({GREEDY_TOKENS} tokens)", same == len(prompts),
                      f"{same}/{len(prompts)} prompts", "all"))
    windows, tokens_per_byte, where = _windows(tokenizer, token_dir)
    bpb = {"fp32": onnx_bpb(fp32, windows, tokens_per_byte)}
    from runtime_python.onnx_backend import ONNX_FILES

    variants = [d for d in ("q8", "q8-gqa", "q4") if (folder / "onnx" / ONNX_FILES[d]).is_file()]
    sizes = {"fp32": (folder / "onnx" / "model.onnx").stat().st_size}
    backends = {"fp32": fp32}
    for dtype in variants:
        log(f"export: gates: onnx {dtype} ...")
        backend = backends[dtype] = OnnxBackend(folder, dtype)
        sizes[dtype] = backend_path_size(folder, dtype)
        bpb[dtype] = onnx_bpb(backend, windows, tokens_per_byte)
        rel = bpb[dtype] / bpb["fp32"] - 1
        agree = _agreement([backend.greedy(ids, GREEDY_TOKENS) for ids in prompts], reference)
        required = dtype.startswith("q8")
        gates.append(gate(f"ONNX {dtype} bits/byte vs fp32", abs(rel) <= INT8_BPB_TOLERANCE if required else None,
                          f"{bpb[dtype]:.4f} vs {bpb['fp32']:.4f} ({rel:+.2%})", f"within {INT8_BPB_TOLERANCE:.0%}",
                          where, required=required))
        gates.append(gate(f"ONNX {dtype} greedy agreement ({GREEDY_TOKENS} tokens)",
                          agree >= AGREEMENT_TARGET if required else None, f"{agree:.0%} of prompts",
                          f">= {AGREEMENT_TARGET:.0%} (target, reported)", required=False))
        ratio = sizes[dtype] / sizes["fp32"]
        gates.append(gate(f"ONNX {dtype} size vs fp32", ratio <= INT8_SIZE_RATIO if required else None,
                          f"{ratio:.0%} ({sizes[dtype] / 1e6:.1f} MB)", f"<= {INT8_SIZE_RATIO:.0%}", required=required))
    log("export: gates: transformers + optimum ...")
    gates += hf_gates(folder, model, tokenizer, prompts, reference)
    stopped = torch_greedy(model, prompts, stop_ids=stops)
    gates.append(optimum_gate(folder, prompts, stopped, stops))
    log("export: measuring decode speed (1 thread) ...")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like OnnxBackend's default: comparable rows, robust to a busy second core
    try:
        speed = {"torch_fp32_tok_s": decode_speed(TorchBackend(model, tokenizer), prompts[0]),
                 "torch_int8_tok_s": decode_speed(TorchBackend(model, tokenizer, dtype="int8"), prompts[0])}
    finally:
        torch.set_num_threads(threads)
    for dtype, backend in backends.items():
        name = {"q8": "int8", "q8-gqa": "int8_gqa"}.get(dtype, dtype)
        speed[f"onnx_{name}_tok_s"] = decode_speed(backend, prompts[0])
    quality = {"bits_per_byte": {k: round(v, 4) for k, v in bpb.items()}, "bits_per_byte_text": where,
               "onnx_bytes": sizes}
    return gates, speed, quality


def backend_path_size(folder: Path, dtype: str) -> int:
    from runtime_python.onnx_backend import ONNX_FILES

    return (folder / "onnx" / ONNX_FILES[dtype]).stat().st_size
