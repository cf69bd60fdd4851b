"""Backends: the three calls a chat loop needs from a model (prefill, decode, release).

Design choices:
- `ChatBackend` is a Protocol, not a base class: the chat code needs `prefill(ids)` (reset the
  cache, run the prompt, last-position logits), `decode(id)` (one token in, logits out) and
  `release()`, plus `name`, `tokenizer` and `max_seq_len`. A backend holds ONE KV cache, so it
  serves one conversation at a time; the server batches many through `batching.Engine`.
- `TorchBackend` runs the `.pth` weights with its own lean forward instead of calling
  `Transformer.forward` per token. Decoding a model this small is bound by Python/dispatch
  overhead and by streaming the weights from memory, so the step does little: q|k|v and gate|up
  fused into one matmul each; the softmax scale folded into the q weights; logits for the last
  position of each sequence only; the `KVCache` preallocated and written in place.
- One forward, `forward_rows`, for one sequence or many: it takes (slot, position, ids) segments,
  so the batching engine (`runtime_python/batching.py`) and this batch-1 backend run the same code.
  In fp32 a sequence gets the same logits, bit for bit, alone, batched with others, with its prompt
  in chunks of any size, or after a cached prefix: no row's matmul has a shape that depends on the
  rest of the batch (`runtime_python/rows.py` says how). So prefill runs in PREFILL_CHUNK pieces and
  reuses the K/V of the previous prompt's common prefix (a chat's earlier turns). The result equals
  `Transformer.forward` to float rounding (tested).
- dtypes: "fp32" (default; the reference numerics), "bf16" (bf16 weights and matmul inputs; the
  residual stream and norms stay fp32 as under the bf16 autocast the model trained with; on CPU
  the weights are pre-packed for oneDNN, whose bf16 kernels beat plain `F.linear`),
  and "int8" (CPU only: weight-only int8 with one scale per output row, bf16 matmul inputs,
  `torch._weight_int8pack_mm`; a quarter of the fp32 weight bytes, small logit error, not exact).
  bf16 and int8 keep a weaker batching guarantee: their kernels have no batched form, so one call
  takes all of a step's rows and a batched request's logits may differ from alone in the last bits.
- `compile=True` wraps the single-token step in `torch.compile` (dynamic shapes; the first
  decodes compile, which takes seconds). It gave no reliable gain on a small
  shared CPU, so it is off by default; `benchmarks/decode.py --compile` measures it on yours.
- Tokenizer check: a checkpoint records the sha256 of its tokenizer.model; loading it with another
  tokenizer raises a ValueError that names both, instead of generating garbage.
- OnnxBackend lives in `runtime_python/onnx_backend.py` (onnxruntime over a `.pth` or a `builder export`
  folder, same Protocol) and is importable from here; onnxruntime is only imported when it is asked for.
  HFBackend (`runtime_python/hf_backend.py`) runs any local transformers causal-LM folder.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from runtime_python.rows import BLOCK, PROMPT_BLOCK, attend, block_layout, chunk_end, key_mask, linear_rows
from source.checkpoint import load_model
from source.hf_tokenizer import has_tokenizer, load_tokenizer
from source.model import KVCache, Transformer
from source.tokenizer import ChatTokenizer, Tokenizer

DTYPES = ("fp32", "bf16", "int8")
DEVICES = ("cpu", "cuda", "mps", "auto")
DEFAULT_TOKENIZER_DIR = Path("runs/tokenizer")
PREFILL_CHUNK = 128  # prompt tokens per forward


@runtime_checkable
class ChatBackend(Protocol):
    name: str
    tokenizer: ChatTokenizer
    max_seq_len: int

    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Reset the cache, run the prompt; fp32 logits of its last position, shape (vocab,).
        (TorchBackend returns inference tensors: copy them before editing in place outside
        `torch.inference_mode()`; `sample_next` never edits them.)"""
        ...

    def decode(self, token_id: int) -> torch.Tensor:
        """Append one token; fp32 logits for the next one, shape (vocab,)."""
        ...

    def release(self) -> None:
        """Free the weights and the cache; the backend is unusable afterwards."""
        ...


# ----------------------------------------------------------------------------- resolving a model

def default_tokenizer_dir(model_path: str | Path) -> Path:
    """`tokenizer/` beside the .pth (registry versions have one), else runs/tokenizer."""
    beside = Path(model_path).parent / "tokenizer"
    if has_tokenizer(beside):
        return beside
    if has_tokenizer(DEFAULT_TOKENIZER_DIR):
        return DEFAULT_TOKENIZER_DIR
    raise FileNotFoundError(f"no tokenizer for {model_path}: neither {beside}/ nor {DEFAULT_TOKENIZER_DIR}/ holds a "
                            "tokenizer.model or tokenizer.json; pass the tokenizer folder the model was trained with "
                            "(--tokenizer DIR)")


def resolve_model(spec: str | None, models_root: str | Path = "models",
                  tokenizer_dir: str | Path | None = None) -> tuple[Path, Path]:
    """(model.pth, tokenizer dir) for None (the registry's champion), a registry reference ("v3",
    "3", "champion", "latest") or a path to a .pth (or to a folder holding model.pth). `tokenizer_dir`,
    when given, is the tokenizer: a path then needs none beside it or in runs/."""
    from source.registry import Registry  # light: no torch import

    registry = Registry(models_root)
    ref = None if spec is None else str(spec).strip()
    is_ref = ref is None or ref.lower() in ("champion", "latest") or bool(re.fullmatch(r"[vV]?\d+", ref))
    if is_ref and not (ref is not None and Path(ref).exists()):
        if ref is None or ref.lower() == "champion":
            version = registry.champion()
            if version is None:
                raise FileNotFoundError(f"no champion in {registry.path}; train one or pass --model PATH")
        else:
            version = registry.get(ref)  # RegistryError (a ValueError) names the known versions
        folder = registry.root / "versions" / version.id
        model, tokenizer = folder / "model.pth", folder / "tokenizer"
        for path in (model, tokenizer / ("tokenizer.json" if (tokenizer / "tokenizer.json").is_file() else
                                         "tokenizer.model")):
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing although {registry.path} lists {version.id}; "
                                        f"check it with `builder models info {version.id}`")
        return model, Path(tokenizer_dir) if tokenizer_dir is not None else tokenizer
    path = Path(ref)
    if path.is_dir():
        path = path / "model.pth"
    if not path.is_file():
        raise FileNotFoundError(f"model {ref!r} not found: pass a .pth file or a registry version "
                                "(v3, champion, latest)")
    return path, Path(tokenizer_dir) if tokenizer_dir is not None else default_tokenizer_dir(path)


def load_checkpoint(model_path: str | Path, tokenizer_dir: str | Path | None = None,
                    device: torch.device | str = "cpu") -> tuple[Transformer, Tokenizer, str]:
    """(model, tokenizer, name) from a `.pth` (weights only) and the tokenizer it was trained with: a
    ValueError that names both when the tokenizer is another one, instead of generating garbage. The name
    is "v3" for models/versions/v3/model.pth, "base-small" for runs/base-small/model.pth."""
    model_path = Path(model_path)
    tokenizer = load_tokenizer(tokenizer_dir if tokenizer_dir is not None else default_tokenizer_dir(model_path))
    model, ckpt = load_model(model_path, device)
    if ckpt["tokenizer"] != tokenizer.sha256:
        raise ValueError(f"{model_path} was trained with tokenizer sha256 {ckpt['tokenizer'][:12]}..., but "
                         f"the tokenizer in {tokenizer.path} has {tokenizer.sha256[:12]}...: pass the tokenizer "
                         "folder it was trained with (--tokenizer DIR)")
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"{tokenizer.path}: {tokenizer.vocab_size} tokens, but the model has only "
                         f"{model.cfg.vocab_size} embeddings")
    name = model_path.parent.name if model_path.stem == "model" and model_path.parent.name else model_path.stem
    return model, tokenizer, name


def pick_device(device: str) -> torch.device:
    kind = device.split(":")[0]
    if kind not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {device!r}")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch sees no CUDA GPU (try --device cpu)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for, but torch sees no Apple GPU (try --device cpu)")
    return torch.device(device)


# ----------------------------------------------------------------------------- linear kernels

def _rows(w: torch.Tensor) -> tuple[torch.Tensor, Callable]:
    """fp32: the weight transposed once here, for `rows.linear_rows` (its stride-0 bmm reads W.T)."""
    return w.t(), linear_rows


def _onednn_bf16(w: torch.Tensor) -> tuple[torch.Tensor, Callable]:
    """A bf16 weight pre-packed for oneDNN (what inductor's freezing does); dense F.linear if the
    op is missing or disagrees."""
    w = w.to(torch.bfloat16).contiguous()
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)

        def linear(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [None], "")

        probe = torch.randn(3, w.shape[1], dtype=torch.bfloat16)
        if torch.allclose(linear(probe, packed).float(), F.linear(probe, w).float(), atol=1e-2, rtol=1e-2):
            return packed, linear
    except (AttributeError, RuntimeError):
        pass
    return w, F.linear


def _int8(w: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], Callable]:
    """Symmetric per-output-row int8: w ~= q * scale[:, None]. Activations must be bf16: the kernel's
    fp32-activation path is an order of magnitude slower."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    scale = scale.to(torch.bfloat16)

    def linear(x: torch.Tensor, p: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), p[0], p[1]).view(*x.shape[:-1], -1)

    return (q, scale), linear


# ----------------------------------------------------------------------------- the torch backend

class TorchBackend(ChatBackend):
    """A `Transformer` behind the ChatBackend protocol, with a preallocated KV cache (batch 1)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None, name: str = "supermix",
                 dtype: str = "fp32", compile: bool = False) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        cfg, device = model.cfg, model.embed_tokens.weight.device
        if dtype == "int8" and device.type != "cpu":
            raise ValueError(f"dtype 'int8' runs on the CPU only (device is {device.type}); use bf16 or fp32")
        # no reference to `model` is kept: its per-layer weights were re-laid out (fused) below, so
        # the originals can be freed when the caller drops the model (load() does)
        self.cfg, self.tokenizer, self.name = cfg, tokenizer, name
        self.device, self.dtype, self.max_seq_len = device, dtype, cfg.max_seq_len
        self.params = model.num_params()
        # the dtype of the weight matmuls' inputs; the residual stream, norms, RoPE, attention and the
        # cache stay fp32: CPU bf16 bmm on these small shapes is much slower than fp32
        self._act = torch.float32 if dtype == "fp32" else torch.bfloat16
        H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # pre-packed oneDNN weights are opaque to inductor (it packs its own): plain bf16 under compile
        onednn = device.type == "cpu" and not compile
        pack = {"fp32": _rows, "int8": _int8,
                "bf16": _onednn_bf16 if onednn else (lambda w: (w.to(torch.bfloat16), F.linear))}[dtype]
        with torch.inference_mode():
            self._layers = []

            def bias(*params: torch.Tensor | None) -> torch.Tensor | None:  # a base's biases, in the matmul's dtype
                return None if params[0] is None else torch.cat(params).to(self._act)

            for block in model.layers:
                a, m = block.self_attn, block.mlp
                # softmax scale folded into q (and its bias): RoPE is linear, so rope(s*q) = s*rope(q)
                qkv = torch.cat([a.q_proj.weight / math.sqrt(hd), a.k_proj.weight, a.v_proj.weight])
                b_q = None if a.q_proj.bias is None else a.q_proj.bias / math.sqrt(hd)
                self._layers.append((block.input_layernorm.weight.float(), pack(qkv), pack(a.o_proj.weight),
                                     block.post_attention_layernorm.weight.float(),
                                     pack(torch.cat([m.gate_proj.weight, m.up_proj.weight])), pack(m.down_proj.weight),
                                     (bias(b_q, a.k_proj.bias, a.v_proj.bias), bias(a.o_proj.bias),
                                      bias(m.gate_proj.bias, m.up_proj.bias), bias(m.down_proj.bias))))
            self._norm = model.norm.weight.float()
            self._lm_head = pack(model.lm_head.weight)
            self._embed = model.embed_tokens.weight.float()
            self._cos, self._sin = model.rope_cos.float(), model.rope_sin.float()
            self.cache = KVCache(cfg, 1, cfg.max_seq_len, dtype=torch.float32, device=device)
        self._tokens: list[int] = []  # the ids whose K/V the cache holds (a new prompt reuses their prefix)
        self._prompted = 0  # how many of them came from a prompt (prefill), not from decode
        self.cached_tokens = 0  # of the last prompt, reused from the one before
        self._shape = (H, KV, hd, H // KV, cfg.ffn_hidden, cfg.norm_eps)
        self._step = torch.compile(self.forward_rows, dynamic=True) if compile else self.forward_rows

    @classmethod
    def load(cls, model_path: str | Path, tokenizer_dir: str | Path | None = None, device: str = "cpu",
             dtype: str = "fp32", compile: bool = False, name: str | None = None,
             threads: int | None = None) -> "TorchBackend":
        """Load a `.pth` (weights only) with its tokenizer. `threads` sets torch's (process-wide)
        intra-op thread count; small models often decode faster on one thread."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        model, tokenizer, default_name = load_checkpoint(model_path, tokenizer_dir, pick_device(device))
        if threads is not None:
            torch.set_num_threads(threads)
        return cls(model, tokenizer, name=name or default_name, dtype=dtype, compile=compile)

    # -- the protocol

    def prefill(self, ids: list[int]) -> torch.Tensor:
        check_prompt(ids, self.max_seq_len, released=self._layers is None)
        # the K/V of the previous prompt's common prefix (a chat's earlier turns) are bit for bit what a
        # recomputation would give (in fp32; see forward_rows); decoded tokens' K/V came from the one-row
        # kernels, not the prompt blocks, so they are recomputed; at least one token always runs, for the logits
        keep = common_prefix(self._tokens[:self._prompted], ids, len(ids) - 1)
        del self._tokens[keep:]  # in place: copies of this backend (tests' Steered) share the list
        self.cached_tokens = keep
        with torch.inference_mode():
            start = keep
            while start < len(ids):
                end = chunk_end(start, len(ids), PREFILL_CHUNK)
                logits = self.forward_rows([], [(0, start, ids[start:end])], self.cache)[0]
                start = end
        self._tokens.extend(ids[keep:])
        self._prompted = self.cache.length = len(ids)
        return logits

    def decode(self, token_id: int) -> torch.Tensor:
        if self._layers is None:
            raise RuntimeError("this backend was released")
        pos = len(self._tokens)
        if pos >= self.max_seq_len:
            raise ValueError(f"the model's window of {self.max_seq_len} tokens is full")
        with torch.inference_mode():
            logits = self._step([(0, pos, token_id)], [], self.cache)[0]
        self._tokens.append(token_id)
        self.cache.length = pos + 1
        return logits

    def release(self) -> None:
        self._layers = self._lm_head = self._embed = self.cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- the forward pass

    def forward_rows(self, decodes: list[tuple[int, int, int]], prompts: list[tuple[int, int, list[int]]],
                     cache: KVCache) -> torch.Tensor:
        """One forward over many sequences, each in its own cache slot (at most one entry per slot):
        `decodes` are (slot, position, token id), `prompts` (slot, position of the first id, ids), a prompt
        or a chunk of one. K/V are written into `cache` (layers, slots, ...). Returns fp32 logits
        (len(decodes) + len(prompts), vocab): each decode's, then each prompt's last token's.
        Mirrors `Transformer.forward`. The rows are laid out for `runtime_python/rows.py`, whose matmuls give
        a row the same result in any batch: decodes first, one row each, then each prompt chunk in
        position-aligned blocks."""
        H, KV, hd, G, ffn, eps = self._shape
        act, dev = self._act, self.device
        nd = len(decodes)
        p_ids, p_pos, chunks, firsts = block_layout(prompts, nd)
        Q = PROMPT_BLOCK
        ids, rows = [t for _, _, t in decodes] + p_ids, nd + len(p_ids)
        pos = torch.tensor([p for _, p, _ in decodes] + p_pos, device=dev)
        real = slice(None) if not prompts else torch.tensor(list(range(nd)) + [  # the rows to cache: not the padding
            r for (_, _, seg), f in zip(prompts, firsts) for r in range(f, f + len(seg))], device=dev)
        slot = torch.tensor([s for s, _, _ in decodes] + [s for s, _, seg in prompts for _ in seg], device=dev)
        w_pos = pos[real]
        cos, sin = self._cos[pos][:, None], self._sin[pos][:, None]  # (rows, 1, hd): every head of a row
        if nd:  # decodes attend together over the range of slots they occupy
            d_slot = slot[:nd]
            lo, hi = int(d_slot.min()), int(d_slot.max()) + 1
            d_pos = torch.zeros(hi - lo, 1, G, dtype=torch.long, device=dev)
            d_pos[d_slot - lo] = pos[:nd, None, None]
            d_mask = key_mask(d_pos.expand(-1, KV, -1).reshape(-1, G), int(pos[:nd].max()) + 1, cache.k.shape[3])
        # a chunk's blocks x kv heads are the items of one batched attention, (blocks * KV, Q * G) query rows
        p_masks = [key_mask(pos[r:r + nb * Q].view(nb, 1, Q).expand(-1, KV, -1).repeat_interleave(G, -1).flatten(0, 1),
                            end, cache.k.shape[3]) for r, nb, end in chunks]
        x = F.embedding(torch.tensor(ids, device=dev), self._embed)  # (rows, dim) fp32 residual stream
        dim, half = (x.shape[-1],), hd // 2
        for i, (ln1, wqkv, wo, ln2, wgu, wd, (b_qkv, b_o, b_gu, b_d)) in enumerate(self._layers):
            h = F.rms_norm(x, dim, ln1, eps).to(act)
            qkv = self._linear(h, wqkv, nd, b_qkv).view(rows, H + 2 * KV, hd).float()
            qk = qkv[:, :H + KV]
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin  # RoPE, HF layout
            k_cache, v_cache = cache.k[i], cache.v[i]  # (slots, KV, max_len, hd)
            k_cache[slot, :, w_pos] = qk[real, H:]
            v_cache[slot, :, w_pos] = qkv[real, H + KV:]
            q = qk[:, :H].reshape(rows, KV, G, hd)  # head h reads kv head h // G, as in HF's repeat_kv
            y = torch.zeros(rows, KV, G, hd, device=dev)
            if nd:
                qd = torch.zeros(hi - lo, KV, G, hd, device=dev)
                qd[d_slot - lo] = q[:nd]
                out = attend(qd.view(-1, G, hd), k_cache[lo:hi].flatten(0, 1), v_cache[lo:hi].flatten(0, 1), d_mask)
                y[:nd] = out.view(hi - lo, KV, G, hd)[d_slot - lo]
            for (s, _, _), (r, nb, _), mask in zip(prompts, chunks, p_masks):  # causal over its own slot
                qc = q[r:r + nb * Q].view(nb, Q, KV, G, hd).transpose(1, 2).reshape(nb * KV, Q * G, hd)
                # each block gets its own copy of the keys it reads: one attend call a chunk, not one a block
                span = min(mask.shape[1] * BLOCK, k_cache.shape[2])
                kc, vc = (c[s, :, :span].expand(nb, -1, -1, -1).reshape(nb * KV, span, hd) for c in (k_cache, v_cache))
                y[r:r + nb * Q] = attend(qc, kc, vc, mask).view(nb, KV, Q, G, hd).transpose(1, 2).flatten(0, 1)
            x = x + self._linear(y.view(rows, H * hd).to(act), wo, nd, b_o)
            h = F.rms_norm(x, dim, ln2, eps).to(act)
            gate, up = self._linear(h, wgu, nd, b_gu).split(ffn, dim=-1)
            x = x + self._linear(F.silu(gate) * up, wd, nd, b_d)
        last = list(range(nd)) + [f + len(seg) - 1 for (_, _, seg), f in zip(prompts, firsts)]
        h = F.rms_norm(x[last] if prompts else x, dim, self._norm, eps).to(act)
        return self._linear(h, self._lm_head, len(last)).float()

    def _linear(self, x: torch.Tensor, packed: tuple, nd: int, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W.T for `nd` one-row items, then prompt blocks (`rows.linear_rows`). The bf16 and int8 kernels
        have no batched form: one call takes every row, so there a row's rounding may depend on the batch."""
        w, lin = packed
        y = lin(x, w, nd) if lin is linear_rows else lin(x, w)
        return y if bias is None else y + bias


def check_prompt(ids: list[int], max_seq_len: int, released: bool) -> None:
    """What every backend's `prefill` refuses: a released backend, an empty prompt, one over the window."""
    if released:
        raise RuntimeError("this backend was released")
    if not ids:
        raise ValueError("prefill needs at least one token")
    if len(ids) > max_seq_len:
        raise ValueError(f"prompt of {len(ids)} tokens exceeds the model's window of {max_seq_len}")


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the longest common prefix of `a` and `b`, at most `limit`."""
    n = 0
    for x, y in zip(a, b):
        if n >= limit or x != y:
            break
        n += 1
    return n


def __getattr__(name: str):
    if name == "OnnxBackend":  # lazy: importing onnxruntime costs time the torch path does not need
        from runtime_python.onnx_backend import OnnxBackend
        return OnnxBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
