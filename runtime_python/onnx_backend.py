"""OnnxBackend: onnxruntime behind the ChatBackend protocol, over a `.pth` or an export folder.

Design choices:
- Two sources, one loop. `OnnxBackend.from_checkpoint(model.pth)` builds the GroupQueryAttention graph
  (source/onnx_graph.py) in memory from the fp32 weights and opens it from bytes, no file written: the
  fastest exact path here, so `supermix chat|ask` run a `.pth` through it by default (greedy tokens
  equal TorchBackend fp32's; docs/pages/benchmarks.md). `OnnxBackend(folder, dtype)` opens a file of a
  `builder export` folder: "fp32" -> onnx/model.onnx, "q8"/"int8" -> onnx/model_quantized.onnx
  (dynamic int8, transformers.js calls it q8), "q4" -> onnx/model_q4.onnx (MatMulNBits), "q8-gqa" ->
  onnx/model_gqa_quantized.onnx (the int8 GroupQueryAttention graph; `--backend onnx --dtype int8`
  takes it when the export has it).
- The graphs have the Hugging Face/optimum IO names (docs/pages/decisions.md): `input_ids`,
  `attention_mask`, `position_ids`, `past_key_values.{i}.key/value` in; `logits`, `present.{i}.key/value`
  out. K/V never leave onnxruntime: they are bound through an `IOBinding` as `OrtValue`s.
- The KV cache of a GroupQueryAttention graph is one max_seq_len buffer per layer and kind, bound as
  both the past input and the present output, once: each step writes only its new positions, so decode
  does not slow down as the context grows. The portable graph (torch-exported, a Concat per layer)
  cannot share: there each step's `present.*` becomes the next step's past.
- A new prompt reuses the K/V of the previous prompt's common prefix (not of decoded tokens, as in
  TorchBackend), so a chat turn runs only its new tokens; `cached_tokens` says how many were reused.
- Logits land in a buffer of ours (one preallocated for decode steps) and are copied out once.
- One intra-op thread by default: a decode step of a model this small is ~120-400 tiny ops, and thread
  hand-offs cost more than they save, badly so when another process holds a core
  (docs/pages/decisions.md). `threads=None` lets onnxruntime pick.
- The tokenizer is the one the torch backend uses (beside the `.pth`, or copied into the export folder: our
  sentencepiece model, or an imported base's tokenizer.json and chat template), so prompts, stop handling and
  detokenisation are shared code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from runtime_python.backends import check_prompt, common_prefix, load_checkpoint
from source.hf_tokenizer import load_tokenizer
from source.model import Transformer
from source.tokenizer import ChatTokenizer

ONNX_FILES = {"fp32": "model.onnx", "q8": "model_quantized.onnx", "int8": "model_quantized.onnx",
              "q4": "model_q4.onnx", "q8-gqa": "model_gqa_quantized.onnx"}


class OnnxBackend:
    """onnxruntime (CPU) at batch 1, the KV cache kept in onnxruntime `OrtValue`s."""

    def __init__(self, export_dir: str | Path, dtype: str = "fp32", threads: int | None = 1,
                 name: str | None = None) -> None:
        folder = Path(export_dir)
        if dtype not in ONNX_FILES:
            raise ValueError(f"ONNX dtype must be one of {', '.join(ONNX_FILES)}, got {dtype!r}")
        path = folder / "onnx" / ONNX_FILES[dtype]
        if not path.is_file():
            hint = " (export with --q4)" if dtype == "q4" else ""
            raise FileNotFoundError(f"{path} not found: pass a folder written by `builder export`{hint}")
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        manifest = folder / "manifest.json"
        contrib = dtype == "q8-gqa" or (manifest.is_file() and  # `builder export --graph contrib`
                                        json.loads(manifest.read_text(encoding="utf-8")).get("onnx_graph") == "contrib")
        head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
        self._open(str(path), load_tokenizer(folder), name or folder.name, dtype, threads, shared_cache=contrib,
                   dims=(int(config["num_hidden_layers"]), int(config["num_key_value_heads"]), head_dim,
                         int(config["max_position_embeddings"]), int(config["vocab_size"])))

    @classmethod
    def from_checkpoint(cls, model_path: str | Path, tokenizer_dir: str | Path | None = None,
                        threads: int | None = 1, name: str | None = None) -> "OnnxBackend":
        """The fp32 GroupQueryAttention graph of a `.pth`, built in memory (see the module docstring)."""
        model, tokenizer, default_name = load_checkpoint(model_path, tokenizer_dir)
        return cls.from_model(model, tokenizer, name or default_name, threads)

    @classmethod
    def from_model(cls, model: Transformer, tokenizer: ChatTokenizer, name: str = "supermix",
                   threads: int | None = 1) -> "OnnxBackend":
        """The fp32 GroupQueryAttention graph of loaded weights (a ValueError when the shape does not fit it)."""
        from source.onnx_graph import contrib_graph

        cfg = model.cfg
        backend = cls.__new__(cls)
        backend._open(contrib_graph(model).SerializeToString(), tokenizer, name, "fp32", threads, shared_cache=True,
                      dims=(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, cfg.max_seq_len, cfg.vocab_size))
        return backend

    def _open(self, model: str | bytes, tokenizer: ChatTokenizer, name: str, dtype: str, threads: int | None,
              shared_cache: bool, dims: tuple[int, int, int, int, int]) -> None:
        import onnxruntime as ort

        n_layers, kv_heads, head_dim, self.max_seq_len, vocab = dims
        self.tokenizer, self.name, self.dtype, self.n_layers = tokenizer, name, dtype, n_layers
        self.kv_shape = (1, kv_heads, 0, head_dim)  # an empty past (the export gates feed it too)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if dtype != "fp32":
            # lets constant folding turn the int8 embedding's DequantizeLinear (+ the tied lm_head's
            # Transpose) into one fp32 table at load, instead of every step: -16% per token here
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self._ort = ort
        inputs = {i.name for i in self.session.get_inputs()}
        self._past_names = [f"past_key_values.{i}.{t}" for i in range(n_layers) for t in ("key", "value")]
        self._present_names = [f"present.{i}.{t}" for i in range(n_layers) for t in ("key", "value")]
        missing = {"input_ids", "attention_mask", "position_ids", *self._past_names} - inputs
        if missing:
            raise ValueError(f"{name}: not a supermix/HF KV-cache graph, missing inputs {sorted(missing)}")
        self._ones = np.ones((1, self.max_seq_len), dtype=np.int64)
        self._positions = np.arange(self.max_seq_len, dtype=np.int64)[None]
        self._step_logits = np.empty((1, 1, vocab), dtype=np.float32)
        self._shared = shared_cache
        self._binding = self.session.io_binding() if shared_cache else None  # the portable graph binds per step
        if shared_cache:
            for past, present in zip(self._past_names, self._present_names):
                shape = (1, kv_heads, self.max_seq_len, head_dim)
                buffer = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32)
                self._binding.bind_ortvalue_input(past, buffer)
                self._binding.bind_ortvalue_output(present, buffer)
        self._past: list | None = None
        self._tokens: list[int] = []  # the ids whose K/V the cache holds
        self._prompted = 0  # how many of them came from a prompt (prefill), not from decode
        self.cached_tokens = 0  # of the last prompt, reused from the one before

    def _run(self, ids: np.ndarray, start: int) -> torch.Tensor:
        """Run `ids` at positions start.. over the cache; the last position's logits."""
        end = start + ids.shape[1]
        binding = self._binding if self._shared else self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", self._ones[:, :end])
        binding.bind_cpu_input("position_ids", self._positions[:, start:end])
        shape = (1, ids.shape[1], self._step_logits.shape[2])
        logits = self._step_logits if ids.shape[1] == 1 else np.empty(shape, dtype=np.float32)
        # bound first, so the portable graph's presents follow it in get_outputs()
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        if not self._shared:
            for name, value in zip(self._past_names, self._past):
                binding.bind_ortvalue_input(name, value)
            for name in self._present_names:
                binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        if not self._shared:
            self._past = binding.get_outputs()[1:]
        return torch.from_numpy(logits[0, -1].copy())

    # -- the protocol

    def prefill(self, ids: list[int]) -> torch.Tensor:
        check_prompt(ids, self.max_seq_len, released=self.session is None)
        keep = 0
        if self._shared:  # the previous prompt's common prefix (a chat's earlier turns) stays in the buffer:
            # GroupQueryAttention runs the rest as a continued prompt and reads only positions 0..len(ids)
            keep = common_prefix(self._tokens[:self._prompted], ids, len(ids) - 1)
        else:
            empty = self._ort.OrtValue.ortvalue_from_numpy(np.zeros(self.kv_shape, dtype=np.float32))
            self._past = [empty] * len(self._past_names)
        self._tokens, self._prompted = [], 0  # until the run succeeds, nothing in the cache is reusable
        logits = self._run(np.array([ids[keep:]], dtype=np.int64), keep)
        self._tokens, self._prompted, self.cached_tokens = list(ids), len(ids), keep
        return logits

    def decode(self, token_id: int) -> torch.Tensor:
        if self.session is None:
            raise RuntimeError("this backend was released")
        pos = len(self._tokens)
        if pos == 0:
            raise RuntimeError("decode() before prefill()")
        if pos >= self.max_seq_len:
            raise ValueError(f"the model's window of {self.max_seq_len} tokens is full")
        logits = self._run(np.array([[token_id]], dtype=np.int64), pos)
        self._tokens.append(token_id)
        return logits

    def release(self) -> None:
        self.session = self._binding = self._past = None

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
