"""OnnxBackend: an exported folder's ONNX model (`builder export`) behind the ChatBackend protocol.

Design choices:
- The graph has the Hugging Face/optimum IO names (docs/pages/decisions.md): `input_ids`, `attention_mask`,
  `position_ids`, `past_key_values.{i}.key/value` in; `logits`, `present.{i}.key/value` out. A decode
  step feeds the previous step's `present.*` back as `past_key_values.*`.
- Those K/V tensors never leave onnxruntime: the step binds them through an `IOBinding` as the
  `OrtValue`s the last run produced, so nothing is copied into numpy and back per token (the cache
  grows by one position per step inside the graph's Concat).
- dtype picks the file: "fp32" -> onnx/model.onnx, "q8"/"int8" -> onnx/model_quantized.onnx (dynamic
  int8, transformers.js calls it q8), "q4" -> onnx/model_q4.onnx (MatMulNBits), "q8-gqa" ->
  onnx/model_gqa_quantized.onnx (the same int8 weights in onnxruntime's GroupQueryAttention graph, the
  fastest file here; `supermix --backend onnx --dtype int8` takes it when the export has it).
- One intra-op thread by default: a decode step of a model this small is ~400 tiny ops, and thread
  hand-offs cost more than they save, badly so when another process holds a core
  (docs/pages/decisions.md). `threads=None` lets onnxruntime pick.
- The tokenizer is the sentencepiece model copied into the export folder, the same `Tokenizer` the
  torch backend uses, so prompts, stop handling and detokenisation are shared code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from source.tokenizer import Tokenizer

ONNX_FILES = {"fp32": "model.onnx", "q8": "model_quantized.onnx", "int8": "model_quantized.onnx",
              "q4": "model_q4.onnx", "q8-gqa": "model_gqa_quantized.onnx"}


class OnnxBackend:
    """onnxruntime (CPU) over `DIR/onnx/<file>` with batch 1 and the KV cache kept in the session."""

    def __init__(self, export_dir: str | Path, dtype: str = "fp32", threads: int | None = 1,
                 name: str | None = None) -> None:
        import onnxruntime as ort

        folder = Path(export_dir)
        if dtype not in ONNX_FILES:
            raise ValueError(f"ONNX dtype must be one of {', '.join(ONNX_FILES)}, got {dtype!r}")
        path = folder / "onnx" / ONNX_FILES[dtype]
        if not path.is_file():
            hint = " (export with --q4)" if dtype == "q4" else ""
            raise FileNotFoundError(f"{path} not found: pass a folder written by `builder export`{hint}")
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        self.tokenizer = Tokenizer.load(folder)
        self.name = name or folder.name
        self.dtype = dtype
        self.max_seq_len = int(config["max_position_embeddings"])
        self.n_layers = int(config["num_hidden_layers"])
        self.kv_shape = (1, int(config["num_key_value_heads"]), 0,
                         int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]))
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if dtype != "fp32":
            # lets constant folding turn the int8 embedding's DequantizeLinear (+ the tied lm_head's
            # Transpose) into one fp32 table at load, instead of every step: -16% per token here
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._ort = ort
        inputs = {i.name for i in self.session.get_inputs()}
        self._past_names = [f"past_key_values.{i}.{t}" for i in range(self.n_layers) for t in ("key", "value")]
        missing = {"input_ids", "attention_mask", "position_ids", *self._past_names} - inputs
        if missing:
            raise ValueError(f"{path}: not a supermix/HF KV-cache export, missing inputs {sorted(missing)}")
        self._out_names = [o.name for o in self.session.get_outputs()]
        self._ones = np.ones((1, self.max_seq_len), dtype=np.int64)
        self._positions = np.arange(self.max_seq_len, dtype=np.int64)[None]
        self._past: list | None = None
        self._pos = 0

    def _run(self, ids: np.ndarray, start: int, past: list) -> np.ndarray:
        binding = self.session.io_binding()
        end = start + ids.shape[1]
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(self._ones[:, :end]))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(self._positions[:, start:end]))
        for name, value in zip(self._past_names, past):
            binding.bind_ortvalue_input(name, value)
        for name in self._out_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self._past = outputs[1:]
        self._pos = end
        return outputs[0].numpy()[0, -1]

    # -- the protocol

    def prefill(self, ids: list[int]) -> torch.Tensor:
        if self.session is None:
            raise RuntimeError("this backend was released")
        if not ids:
            raise ValueError("prefill needs at least one token")
        if len(ids) > self.max_seq_len:
            raise ValueError(f"prompt of {len(ids)} tokens exceeds the model's window of {self.max_seq_len}")
        empty = self._ort.OrtValue.ortvalue_from_numpy(np.zeros(self.kv_shape, dtype=np.float32))
        logits = self._run(np.array([ids], dtype=np.int64), 0, [empty] * len(self._past_names))
        return torch.from_numpy(logits.astype(np.float32, copy=True))

    def decode(self, token_id: int) -> torch.Tensor:
        if self.session is None:
            raise RuntimeError("this backend was released")
        if self._past is None:
            raise RuntimeError("decode() before prefill()")
        if self._pos >= self.max_seq_len:
            raise ValueError(f"the model's window of {self.max_seq_len} tokens is full")
        logits = self._run(np.array([[token_id]], dtype=np.int64), self._pos, self._past)
        return torch.from_numpy(logits.astype(np.float32, copy=True))

    def release(self) -> None:
        self.session = self._past = None

    def greedy(self, ids: list[int], max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
        """Argmax decoding (the export gates and benchmarks use it): ids of up to `max_new_tokens`."""
        out: list[int] = []
        logits = self.prefill(ids)
        budget = min(max_new_tokens, self.max_seq_len - len(ids))
        while len(out) < budget:
            nxt = int(logits.argmax())
            if nxt in stop_ids:
                break
            out.append(nxt)
            if len(out) < budget:
                logits = self.decode(nxt)
        return out
