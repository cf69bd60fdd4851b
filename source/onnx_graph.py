"""The decoder as an onnxruntime contrib-op graph, written node by node with `onnx.helper`.

Two users: the runtime builds it in memory from a `.pth` (`OnnxBackend.from_checkpoint`, the default
engine of `supermix chat|ask`), and `builder export` writes it, int8, as onnx/model_gqa_quantized.onnx.
Per layer: SimplifiedLayerNormalization, one MatMul for q|k|v, one
`com.microsoft.GroupQueryAttention` (rotary from cos/sin tables, causal mask, KV-cache append and the
grouped heads in one kernel), MatMul, residual Add, norm, one MatMul for gate|up, SiLU, MatMul, Add;
onnxruntime fuses the Add + norm pairs itself. ~120 nodes instead of the ~510 that
`torch.onnx.export` of `OnnxForward` gives, and onnxruntime dispatches each node at a few microseconds,
which at batch 1 is most of a token's time (docs/pages/benchmarks.md, `benchmarks/onnx_gqa.py`).

Same HF input/output names as the export's portable graph. `position_ids` is accepted and unused:
GroupQueryAttention takes positions from the attention mask's length (row sum - 1 is the last key), so
the graph is exact for batch 1 and right-padded batches, not for left-padded ones: `builder export
--graph torch` keeps the plain-op graph for that. onnxruntime-web's wasm build carries the contrib
kernels, so the browser runs this graph too.

The KV cache can live in one preallocated buffer per layer and kind: when a `past_key_values.*` input
is max_seq_len long and bound (IOBinding) to the very buffer its `present.*` output is bound to,
GroupQueryAttention writes only the new positions into it and reads the first `total_sequence_length`
(the mask's width) keys, instead of copying the whole cache into a new output every step.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from source.config import ModelConfig
from source.model import Transformer, rope_inv_freq


def fits(cfg: ModelConfig) -> bool:
    """Whether GroupQueryAttention's CPU kernel takes this shape: its rotary wants head_dim % 16 == 0."""
    return cfg.head_dim % 16 == 0


def contrib_graph(model: Transformer) -> onnx.ModelProto:
    """The decoder as an onnxruntime contrib-op graph (see the module docstring), HF IO names."""
    if not fits(model.cfg):
        raise ValueError(f"head_dim {model.cfg.head_dim} is not a multiple of 16, which GroupQueryAttention's "
                         "rotary needs: use the torch backend or `builder export --graph torch`")
    cfg, sd = model.cfg, {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    H, KV, D, L = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
    inits, nodes = [], []

    def init(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs) -> None:
        nodes.append(helper.make_node(op, inputs, outputs, name=f"{op}_{len(nodes)}", domain=domain, **attrs))

    if cfg.rope_scaling == "none":  # kept as it was: the release keys its cached evaluation on these bytes
        inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, D, 2, dtype=np.float32) / D))
    else:
        inv_freq = rope_inv_freq(cfg).numpy()
    angles = np.arange(cfg.max_seq_len, dtype=np.float32)[:, None] * inv_freq[None, :]
    init("cos_cache", np.cos(angles).astype(np.float32))
    init("sin_cache", np.sin(angles).astype(np.float32))
    # tied: one (dim, vocab) table serves the lm_head MatMul and, gathered along axis 1, the embedding
    init("lm_head_t", sd["lm_head.weight"].T)
    if not cfg.tie_embeddings:
        init("embed", sd["embed_tokens.weight"])
    init("one", np.array(1, dtype=np.int64))
    init("axis1", np.array([1], dtype=np.int64))
    init("idx1", np.array(1, dtype=np.int64))
    # GroupQueryAttention wants the index of the last valid key per row and the total length
    node("ReduceSum", ["attention_mask", "axis1"], ["mask_sum"], keepdims=0)
    node("Sub", ["mask_sum", "one"], ["last_key"])
    node("Cast", ["last_key"], ["seqlens_k"], to=TensorProto.INT32)
    node("Shape", ["attention_mask"], ["mask_shape"])
    node("Gather", ["mask_shape", "idx1"], ["total_len64"], axis=0)
    node("Cast", ["total_len64"], ["total_len"], to=TensorProto.INT32)
    if cfg.tie_embeddings:
        node("Gather", ["lm_head_t", "input_ids"], ["h0_t"], axis=1)  # (dim, batch, seq)
        node("Transpose", ["h0_t"], ["h0"], perm=[1, 2, 0])
    else:
        node("Gather", ["embed", "input_ids"], ["h0"], axis=0)
    h = "h0"
    for i in range(L):
        p = f"layers.{i}."
        init(p + "in_norm", sd[p + "input_layernorm.weight"])
        init(p + "post_norm", sd[p + "post_attention_layernorm.weight"])
        init(p + "w_qkv", np.concatenate([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]).T)
        init(p + "w_o", sd[p + "self_attn.o_proj.weight"].T)
        init(p + "w_gu", np.concatenate([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]).T)
        init(p + "w_down", sd[p + "mlp.down_proj.weight"].T)
        init(p + "split_qkv", np.array([H * D, KV * D, KV * D], dtype=np.int64))
        init(p + "split_gu", np.array([cfg.ffn_hidden, cfg.ffn_hidden], dtype=np.int64))
        node("SimplifiedLayerNormalization", [h, p + "in_norm"], [p + "x"], axis=-1, epsilon=cfg.norm_eps)
        node("MatMul", [p + "x", p + "w_qkv"], [p + "qkv" + "_nb" * cfg.qkv_bias])
        if cfg.qkv_bias:
            init(p + "b_qkv", np.concatenate([sd[p + f"self_attn.{n}_proj.bias"] for n in "qkv"]))
            node("Add", [p + "qkv_nb", p + "b_qkv"], [p + "qkv"])
        node("Split", [p + "qkv", p + "split_qkv"], [p + "q", p + "k", p + "v"], axis=-1)
        node("GroupQueryAttention", [p + "q", p + "k", p + "v", f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                                     "seqlens_k", "total_len", "cos_cache", "sin_cache"],
             [p + "attn", f"present.{i}.key", f"present.{i}.value"], domain="com.microsoft",
             num_heads=H, kv_num_heads=KV, do_rotary=1, rotary_interleaved=0, scale=float(D ** -0.5))
        node("MatMul", [p + "attn", p + "w_o"], [p + "attn_out" + "_nb" * cfg.o_bias])
        if cfg.o_bias:
            init(p + "b_o", sd[p + "self_attn.o_proj.bias"])
            node("Add", [p + "attn_out_nb", p + "b_o"], [p + "attn_out"])
        node("Add", [h, p + "attn_out"], [p + "h_mid"])
        node("SimplifiedLayerNormalization", [p + "h_mid", p + "post_norm"], [p + "x2"], axis=-1, epsilon=cfg.norm_eps)
        node("MatMul", [p + "x2", p + "w_gu"], [p + "gu" + "_nb" * cfg.mlp_bias])
        if cfg.mlp_bias:
            init(p + "b_gu", np.concatenate([sd[p + "mlp.gate_proj.bias"], sd[p + "mlp.up_proj.bias"]]))
            node("Add", [p + "gu_nb", p + "b_gu"], [p + "gu"])
        node("Split", [p + "gu", p + "split_gu"], [p + "gate", p + "up"], axis=-1)
        node("Sigmoid", [p + "gate"], [p + "gate_sig"])
        node("Mul", [p + "gate", p + "gate_sig"], [p + "gate_silu"])
        node("Mul", [p + "gate_silu", p + "up"], [p + "act"])
        node("MatMul", [p + "act", p + "w_down"], [p + "mlp_out" + "_nb" * cfg.mlp_bias])
        if cfg.mlp_bias:
            init(p + "b_down", sd[p + "mlp.down_proj.bias"])
            node("Add", [p + "mlp_out_nb", p + "b_down"], [p + "mlp_out"])
        node("Add", [p + "h_mid", p + "mlp_out"], [p + "h_out"])
        h = p + "h_out"
    init("final_norm", sd["norm.weight"])
    node("SimplifiedLayerNormalization", [h, "final_norm"], ["x_final"], axis=-1, epsilon=cfg.norm_eps)
    node("MatMul", ["x_final", "lm_head_t"], ["logits"])

    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", "sequence_length", cfg.vocab_size])]
    for i in range(L):
        for t in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{t}", f32, ["batch_size", KV, "past_sequence_length", D]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{t}", f32, ["batch_size", KV, "total_sequence_length", D]))
    graph = helper.make_graph(nodes, "supermix-contrib", inputs, outputs, inits)
    model_proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model_proto.ir_version = 10  # what the torch graph has, and what onnxruntime-web 1.31 reads
    return model_proto
