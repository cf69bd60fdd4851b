"""Export a checkpoint for other runtimes: an HF folder (transformers / transformers.js layout), ONNX
with a KV cache, int8 (and optional q4) ONNX, the browser retrieval index and a manifest.

Design choices (docs/pages/decisions.md and docs/pages/export.md give the reasons behind them):
- Two ONNX graphs. The portable one (`graph="torch"`, the files transformers.js, optimum and the site
  load) is `OnnxForward`, a KV-cache forward written for export over the model's own modules (explicit
  past K/V in, present K/V out, HF/optimum IO names, attention as plain matmuls with an additive mask
  built from `attention_mask`, so left-padded batches work), through `torch.onnx.export(dynamo=True,
  opset 18)`, traced with batch 2 and past 5 so no dim is frozen. Beside it, `onnx/model_gqa_quantized.onnx`
  is the contrib-op graph (source/onnx_graph.py, onnxruntime's GroupQueryAttention) in int8: ~4x fewer
  nodes, the fastest file natively at batch 1 (exact for batch 1 and right padding), but slower to
  prefill in onnxruntime-web, so the site keeps the portable file. `graph="contrib"` puts the contrib
  graph under the standard names instead.
- int8 is `quantize_dynamic(QInt8)` (MatMul/Gemm/Gather weights; in the contrib graph the embedding
  gathers rows of the lm_head's int8 table, see `_quantize_contrib_int8`), q4 is `MatMulNBitsQuantizer`
  (bits 4, block 32): the formats transformers.js loads as dtype "q8" and "q4".
- `gguf=True` adds gguf/ (builder/gguf.py: llama.cpp / Ollama files) with a read-back gate; the site skips it.
- A version fine-tuned from an imported base (its tokenizer folder holds the base's tokenizer.json, not our
  tokenizer.model) exports through the same path: config.json keeps the base's architecture (`hf_config_dict`:
  llama or qwen2, head_dim, biases, rope scaling, tied or not), the base's tokenizer files are copied with the
  chat template put into tokenizer_config.json (where transformers.js reads it; transformers reads it there
  too), the gates take the `ChatTokenizer` protocol, and the end-of-reply ids are the runtime's.
- An ONNX file whose weights pass EXTERNAL_DATA_BYTES keeps them in `<file>_data` beside it (protobuf stops
  at 2 GiB), the name transformers.js loads when config.json's `transformers.js_config` lists the file.
- Everything is written into a sibling `.partial` folder and renamed into place only after every gate
  passed (`builder/export_gates.py`), so a failed export never leaves a half-written folder behind.
"""

from __future__ import annotations

import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from source.config import config_dict
from builder.export_hf import GENERATION_DEFAULTS, package_version, write_hf_folder
from source.files import replace_dir, sha256_file
from source.hf_tokenizer import load_tokenizer
from source.model import Transformer, apply_rope, rope_inv_freq
from source.tokenizer import Tokenizer

ONNX_OPSET = 18
EXTERNAL_DATA_BYTES = 1_800_000_000  # weights above this go to <file>_data (protobuf's limit is 2 GiB)
EXPORT_FORMAT = "supermix-export-v1"


class OnnxForward(nn.Module):
    """`Transformer` with the KV cache as explicit inputs/outputs (HF names), for ONNX export."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        cfg = model.cfg
        self.model, self.cfg = model, cfg
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def rms_norm(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        # x / sqrt(...), not x * rsqrt(...): onnxruntime fuses this form into one
        # SimplifiedLayerNormalization node (the rsqrt form stays 6 nodes per norm)
        return norm.weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.norm_eps))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cfg, m = self.cfg, self.model
        B, S = input_ids.shape
        P = past[0].shape[2]
        H, KV, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        G = H // KV
        freqs = position_ids.unsqueeze(-1).float() * self.inv_freq  # (B, S, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)  # (B, 1, S, D)
        # causal over absolute key positions, and no attention to padded keys
        keys = torch.arange(P + S, device=input_ids.device)
        queries = torch.arange(S, device=input_ids.device) + P
        allowed = (keys[None, :] <= queries[:, None])[None, None] & (attention_mask[:, None, None, :] > 0)
        bias = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)  # (B, 1, S, P + S)
        h = m.embed_tokens(input_ids)
        presents: list[torch.Tensor] = []
        for i, block in enumerate(m.layers):
            a = block.self_attn
            x = self.rms_norm(h, block.input_layernorm)
            q = apply_rope(a.q_proj(x).view(B, S, H, D).transpose(1, 2), cos, sin)
            k = apply_rope(a.k_proj(x).view(B, S, KV, D).transpose(1, 2), cos, sin)
            v = a.v_proj(x).view(B, S, KV, D).transpose(1, 2)
            k = torch.cat([past[2 * i], k], dim=2)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            # grouped heads without copying K/V per group: the G query heads of a kv head become
            # G*S rows of one matmul against that kv head (head h reads kv head h // G, as in HF)
            q = q.reshape(B, KV, G * S, D)
            att = (q @ k.transpose(-1, -2)).view(B, KV, G, S, P + S) * (D ** -0.5) + bias[:, :, None]
            y = torch.softmax(att, dim=-1).view(B, KV, G * S, P + S) @ v  # (B, KV, G*S, D)
            h = h + a.o_proj(y.view(B, H, S, D).transpose(1, 2).reshape(B, S, H * D))
            h = h + block.mlp(self.rms_norm(h, block.post_attention_layernorm))
        return (m.lm_head(self.rms_norm(h, m.norm)), *presents)


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{t}" for i in range(n_layers) for t in ("key", "value")]
    present = [f"present.{i}.{t}" for i in range(n_layers) for t in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


GRAPHS = ("torch", "contrib")
NATIVE_INT8 = "model_gqa_quantized.onnx"  # contrib graph, int8: onnxruntime's fastest file at batch 1


def external_data(model: Transformer, bytes_per_param: float = 4.0) -> bool:
    """Whether a file of the model's weights at `bytes_per_param` must keep them outside the protobuf."""
    return model.num_params() * bytes_per_param > EXTERNAL_DATA_BYTES


def export_onnx(model: Transformer, path: Path, graph: str = "torch", external: bool = False) -> None:
    """fp32 ONNX with dynamic batch, sequence and past length: `OnnxForward` through
    `torch.onnx.export(dynamo=True)`, or the contrib-op graph. `external`: weights in `<file>_data`."""
    import warnings

    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {', '.join(GRAPHS)}, got {graph!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if graph == "contrib":
        import onnx

        from source.onnx_graph import contrib_graph

        onnx.save(contrib_graph(model), str(path))
        return

    from torch.export import Dim

    cfg = model.cfg
    wrapper = OnnxForward(model).eval()
    B, S, P = 2, 3, 5  # not 1: a dim traced at 1 can be specialised away
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    mask = torch.ones(B, P + S, dtype=torch.long)
    positions = torch.arange(P, P + S)[None].expand(B, S).contiguous()
    past = [torch.randn(B, cfg.n_kv_heads, P, cfg.head_dim) for _ in range(2 * cfg.n_layers)]
    batch, seq, past_len = Dim("batch_size"), Dim("sequence_length"), Dim("past_sequence_length")
    total = Dim("total_sequence_length")
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
              "position_ids": {0: batch, 1: seq}, "past": tuple({0: batch, 2: past_len} for _ in past)}
    inputs, outputs = io_names(cfg.n_layers)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # dynamo's notes on guards and constraints, not problems
        program = torch.onnx.export(wrapper, (ids, mask, positions, *past), dynamic_shapes=shapes,
                                    input_names=inputs, output_names=outputs, opset_version=ONNX_OPSET,
                                    dynamo=True, external_data=False, verbose=False)
    if not external:
        program.save(str(path))
        _strip_debug_metadata(path, path)
        return
    import tempfile

    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # torch names its data file otherwise
        program.save(str(Path(tmp) / path.name), external_data=True)
        _strip_debug_metadata(Path(tmp) / path.name, path, external=True)


def _strip_debug_metadata(src: Path, dst: Path, external: bool = False) -> None:
    """Drop dynamo's per-node debug strings (stack traces, FX node text): ~100 KB on the tiny model, a
    third of its int8 file, and nothing a runtime reads."""
    import onnx

    model = onnx.load(str(src))
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    save_onnx(model, dst, external)


def save_onnx(model, path: Path, external: bool) -> None:
    """onnx.save, the weights in `<file>_data` (transformers.js's name for a file's external data) if `external`."""
    import onnx

    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"{path.name}_data", size_threshold=1024)
    else:
        onnx.save(model, str(path))


def quantize_int8(src: Path, dst: Path, graph: str = "torch", external: bool = False) -> None:
    """Dynamic int8 of an fp32 file that `export_onnx(..., graph)` wrote (`external`: weights in `<file>_data`)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if graph == "contrib":
        _quantize_contrib_int8(src, dst)
        return

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=False, reduce_range=False,
                     op_types_to_quantize=["MatMul", "Gemm", "Gather"], extra_options={"MatMulConstBOnly": True},
                     use_external_data_format=external)
    if external:  # onnxruntime names the data file after the model's file name + ".data"
        import onnx

        save_onnx(onnx.load(str(dst)), dst, external=True)
        for stray in dst.parent.glob(f"{dst.name}.data"):
            stray.unlink()


def _quantize_contrib_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 like the torch graph's (per-tensor, MatMul weights), then the tied table's Gather is
    pointed at the int8 table: gather the int8 rows, dequantize only those. One int8 copy of the table
    in the file, and no per-step dequantization of the whole table (onnxruntime-web cannot be told to
    fold it at load)."""
    import onnx
    from onnx import TensorProto, helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    untied = any(i.name == "embed" for i in onnx.load(str(src), load_external_data=False).graph.initializer)
    # an untied embedding is its own table: int8 like the torch graph's (Gather + DequantizeLinear)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=False, reduce_range=False,
                     op_types_to_quantize=["MatMul", "Gather"] if untied else ["MatMul"],
                     extra_options={"MatMulConstBOnly": True, "DefaultTensorType": TensorProto.FLOAT})
    model = onnx.load(str(dst))
    quantized = any(i.name == "lm_head_t_quantized" for i in model.graph.initializer)
    gather = next((n for n in model.graph.node if n.op_type == "Gather" and n.input[0] == "lm_head_t"), None)
    if quantized and gather is not None:  # tied embeddings: the Gather reads the lm_head's table
        gather.input[0] = "lm_head_t_quantized"
        rows = gather.output[0]
        gather.output[0] = rows + "_int8"
        position = list(model.graph.node).index(gather) + 1
        model.graph.node.insert(position, helper.make_node(
            "DequantizeLinear", [rows + "_int8", "lm_head_t_scale", "lm_head_t_zero_point"], [rows],
            name="DequantizeLinear_embedding_rows"))
        used = {i for n in model.graph.node for i in n.input}
        kept = [i for i in model.graph.initializer if i.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    onnx.save(model, str(dst))


def write_native_int8(model: Transformer, dst: Path) -> None:
    """The contrib-op graph in int8, beside the portable files: what `OnnxBackend` runs natively."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model, Path(tmp) / "model.onnx", "contrib")
        quantize_int8(Path(tmp) / "model.onnx", dst, "contrib")


def quantize_q4(src: Path, dst: Path, external: bool = False) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=32, is_symmetric=True,
                                     accuracy_level=4, op_types_to_quantize=("MatMul",))
    quantizer.process()
    if not external:
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)
        return
    quantizer.model.topological_sort()  # as save_model_to_file does, but with transformers.js's data file name
    save_onnx(quantizer.model.model, dst, external=True)


def gguf_gate(model: Transformer, tokenizer, folder: Path) -> dict:
    """Every GGUF file read back (gguf.GGUFReader): each weight as its dtype rounds ours, q/k un-permuted, and
    the same pieces."""
    from builder.export_gates import gate
    from builder.gguf import DEFAULT_DTYPES, check_gguf, gguf_name

    bar = "every tensor and piece equal (f16/q8_0: ours rounded alike)"
    try:
        for dtype in DEFAULT_DTYPES:
            check_gguf(folder / gguf_name(dtype), model, tokenizer)
        return gate("gguf read-back", True, "equal", bar)
    except ValueError as exc:
        return gate("gguf read-back", False, "differs", bar, detail=str(exc))


def export_model(model_path: str | Path, tokenizer_dir: str | Path, out_dir: str | Path, *,
                 index_path: str | Path | None = None, q4: bool = False, token_dir: str | Path | None = None,
                 version: str | None = None, metrics: dict | None = None, graph: str = "torch", native: bool = True,
                 gguf: bool = False, log=print) -> dict:
    """Write the export folder; returns its manifest. Raises `GateError` (nothing written) when a
    parity/quality gate fails."""
    from builder.export_gates import GateError, run_gates
    from source.checkpoint import load_model
    from source.onnx_graph import fits

    out = Path(out_dir)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "onnx").mkdir(parents=True)
    tokenizer = load_tokenizer(tokenizer_dir)
    model, ckpt = load_model(model_path, "cpu")
    if ckpt["tokenizer"] != tokenizer.sha256:
        raise ValueError(f"{model_path} was trained with tokenizer {ckpt['tokenizer'][:12]}..., "
                         f"{tokenizer.path} has {tokenizer.sha256[:12]}...")
    model.eval()
    timings: dict[str, float] = {}

    def stage(name: str, fn, *args) -> None:
        t0 = time.perf_counter()
        log(f"export: {name} ...")
        fn(*args)
        timings[name] = round(time.perf_counter() - t0, 2)

    big = external_data(model)  # the contrib graph is built as one protobuf: not for weights this large
    if big and graph == "contrib":
        raise ValueError(f"{model_path}: {model.num_params():,} parameters are too many for the contrib graph (one "
                         "protobuf, 2 GiB at most); export with --graph torch")
    onnx_dir = partial / "onnx"
    stage("hf folder", write_hf_folder, model, tokenizer, partial)
    stage("onnx fp32", export_onnx, model, onnx_dir / "model.onnx", graph, big)
    stage("onnx int8", quantize_int8, onnx_dir / "model.onnx", onnx_dir / "model_quantized.onnx", graph,
          external_data(model, 1.0))
    if native and graph == "torch" and fits(model.cfg) and not big:  # GroupQueryAttention takes the shape
        stage("onnx int8 gqa", write_native_int8, model, onnx_dir / NATIVE_INT8)
    if q4:
        stage("onnx q4", quantize_q4, onnx_dir / "model.onnx", onnx_dir / "model_q4.onnx", external_data(model, 0.6))
    if gguf:  # llama.cpp / Ollama files; the site skips gguf/
        from builder.gguf import DEFAULT_DTYPES, write_gguf_folder

        name = f"supermix-{version}" if version else "supermix"
        stage("gguf", write_gguf_folder, model, tokenizer, partial / "gguf", DEFAULT_DTYPES, name, GENERATION_DEFAULTS,
              lambda _: None)
    if index_path is not None:
        stage("retrieval index", shutil.copytree, Path(index_path), partial / "index")
    t0 = time.perf_counter()
    gates, speed, quality = run_gates(model, tokenizer, partial, token_dir=token_dir, log=log)
    if gguf:
        gates.append(gguf_gate(model, tokenizer, partial / "gguf"))
    timings["gates"] = round(time.perf_counter() - t0, 2)
    manifest = {
        "format": EXPORT_FORMAT,
        "model_version": version,
        "source_checkpoint": str(model_path),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "config": config_dict(model.cfg),
        "onnx_graph": graph,
        "params": model.num_params(),
        "tokenizer_sha256": tokenizer.sha256,
        "tokenizer": "sentencepiece" if isinstance(tokenizer, Tokenizer) else "hf",
        "metrics": metrics or {},
        "generation": GENERATION_DEFAULTS,
        "versions": {p: package_version(p) for p in ("torch", "onnx", "onnxruntime", "transformers")},
        "timings_s": timings,
        "gates": gates,
        "speed": speed,
        "quality": quality,
        "files": [{"path": p.relative_to(partial).as_posix(), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
                  for p in sorted(partial.rglob("*")) if p.is_file()],
    }
    (partial / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    failed = [g for g in gates if g["required"] and g["passed"] is False]
    if failed:
        raise GateError(failed, partial)
    replace_dir(partial, out)
    return manifest
