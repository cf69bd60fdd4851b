"""The two ONNX graphs `builder export --graph` can write, side by side on the same weights and loop:
`torch` (plain ops from `torch.onnx.export` of `OnnxForward`) and `contrib` (source/onnx_graph.py,
onnxruntime's GroupQueryAttention), each in fp32 and in the export's int8.

    python benchmarks/onnx_gqa.py --checkpoint models/versions/v2/model.pth

Rows (one thread, interleaved repeats, median): tokens/s over prefill + `--new-tokens` greedy tokens
with a plain `session.run` loop (numpy in and out, the same for every row; the runtime's OnnxBackend
binds the KV cache through IOBinding instead), nodes in the file, and how many greedy tokens equal
PyTorch's (fp32 must match all; int8 drifts by design).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script from anywhere

from builder.export import export_onnx, quantize_int8  # noqa: E402
from source.checkpoint import load_model  # noqa: E402


def session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    if "int8" in path.name:  # as OnnxBackend: fold the int8 embedding's DequantizeLinear at load
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def greedy(sess, cfg, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    """Prefill + `new_tokens` greedy steps with a plain session.run loop; returns (tokens, seconds)."""
    names = [o.name for o in sess.get_outputs()]
    past = {f"past_key_values.{i}.{t}": np.zeros((1, cfg.n_kv_heads, 0, cfg.head_dim), np.float32)
            for i in range(cfg.n_layers) for t in ("key", "value")}
    ids, out, t0 = np.array([prompt], np.int64), [], time.perf_counter()
    total = len(prompt)
    for _ in range(new_tokens):
        start = total - ids.shape[1]
        feed = {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64),
                "position_ids": np.arange(start, total, dtype=np.int64)[None], **past}
        results = sess.run(None, feed)
        nxt = int(results[0][0, -1].argmax())
        out.append(nxt)
        past = {n.replace("present", "past_key_values"): r for n, r in zip(names[1:], results[1:])}
        ids, total = np.array([[nxt]], np.int64), total + 1
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, _ = load_model(args.checkpoint)
    model.eval()
    cfg = model.cfg
    prompt = torch.randint(3, cfg.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():  # reference greedy tokens from PyTorch, full recompute each step
        ids, ref = list(prompt), []
        for _ in range(args.new_tokens):
            nxt = int(model(torch.tensor([ids]))[0][0, -1].argmax())
            ref.append(nxt)
            ids.append(nxt)
    tmp = Path(tempfile.mkdtemp(prefix="gqa-"))
    rows = {}
    for graph in ("torch", "contrib"):  # both graphs from this checkpoint, quantized the way the export does
        export_onnx(model, tmp / f"{graph}.onnx", graph)
        quantize_int8(tmp / f"{graph}.onnx", tmp / f"{graph}_int8.onnx", graph)
        rows[f"{graph}-fp32"], rows[f"{graph}-int8"] = tmp / f"{graph}.onnx", tmp / f"{graph}_int8.onnx"
    sessions = {name: session(path) for name, path in rows.items()}
    times: dict[str, list[float]] = {n: [] for n in sessions}
    tokens = {}
    for name, sess in sessions.items():  # warm-up
        tokens[name], _ = greedy(sess, cfg, prompt, args.new_tokens)
    for _ in range(args.repeats):
        for name, sess in sessions.items():
            _, seconds = greedy(sess, cfg, prompt, args.new_tokens)
            times[name].append(seconds)
    n_total = args.prompt_tokens + args.new_tokens
    base = statistics.median(times["torch-int8"]) if "torch-int8" in times else None
    print(f"{args.checkpoint}: {args.prompt_tokens}-token prompt + {args.new_tokens} greedy tokens, 1 thread, "
          f"median of {args.repeats}; nodes: " + ", ".join(f"{n} {len(onnx.load(str(rows[n]), load_external_data=False).graph.node)}"
                                                            for n in sessions))
    print(f"{'graph':<12} {'tok/s':>8} {'ms/token':>9} {'vs torch-int8':>15} {'tokens == torch':>16}")
    for name in sessions:
        sec = statistics.median(times[name])
        same = sum(a == b for a, b in zip(tokens[name], ref))
        ratio = f"{base / sec:.2f}x" if base else "-"
        print(f"{name:<12} {n_total / sec:>8.0f} {sec / args.new_tokens * 1000:>9.3f} {ratio:>15} "
              f"{same:>9}/{len(ref)}")


if __name__ == "__main__":
    main()
