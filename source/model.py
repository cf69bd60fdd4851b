"""Llama-style decoder-only transformer.

Design choices (all chosen so the weights map 1:1 onto Hugging Face `LlamaForCausalLM`):
- rotary position embeddings (RoPE, half-split "rotate_half" layout as in HF), no learned positions
- RMSNorm before attention and MLP (pre-norm), final RMSNorm
- SwiGLU MLP: down(silu(gate(x)) * up(x))
- grouped-query attention (n_kv_heads <= n_heads), no bias anywhere in our own models
- tied input/output embeddings (one matrix stored once)
- the variants of imported Hugging Face bases (source/base_model.py) are config fields, all off by default:
  an untied head, head_dim other than dim / n_heads, q/k/v biases (Qwen2), o_proj and MLP biases (Llama's
  attention_bias / mlp_bias), "linear" and "llama3" rope scaling, which only change the rotary frequencies
- attention through `F.scaled_dot_product_attention` (fused kernels on CPU and GPU)
- the training loss is a chunked linear + cross-entropy that never holds the whole batch's logits
- incremental decoding with a preallocated KV cache: `KVCache` holds fixed-size tensors and a
  length; a decode step writes one slot in place, so generation never reallocates per token
- optional gradient checkpointing per block, for the large presets
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from source.config import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # computed in fp32 like HF, so bf16 autocast does not lose the variance
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * x.to(dtype)
    device = x.device.type
    if torch.is_autocast_enabled(device):  # cast once here, not in each of the projections that read it
        out = out.to(torch.get_autocast_dtype(device))
    return out


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """The rotary frequencies (head_dim / 2,), rescaled as HF's `rope_scaling` types "linear" and "llama3" do."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    if cfg.rope_scaling == "linear":  # positions divided by the factor, i.e. the frequencies
        return inv_freq / cfg.rope_factor
    if cfg.rope_scaling == "llama3":  # long wavelengths divided by the factor, short ones kept, a blend between
        factor, low, high, old = (cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                                  cfg.rope_original_max_seq_len)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) * ~(wavelen > old / low)
        return torch.where(medium, blended, scaled)
    return inv_freq


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), rope_inv_freq(cfg))
    emb = torch.cat((freqs, freqs), dim=-1)  # HF layout: the two halves share frequencies
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (B or 1, 1, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    # tables cast to x's dtype so bf16 activations are not promoted to fp32 and copied back
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of `hidden @ weight.T`, one chunk of rows at a time: each chunk's logits become its
    loss and its gradients at once (softmax minus one-hot, times the row's coefficient) and are dropped, so
    the (rows, vocab) logits and their gradient never exist whole. The gradients are kept for backward,
    which only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor,
                dtype: torch.dtype, chunk_rows: int, need_grad: bool) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):  # the matmul dtype is chosen by the caller
            h_all, w = hidden.to(dtype), weight.to(dtype)
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            need_h, need_w = (need_grad and needs for needs in ctx.needs_input_grad[:2])  # LoRA freezes the head
            grad_h = torch.zeros_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            for start in range(0, hidden.shape[0], chunk_rows):
                h, t, c = (v[start:start + chunk_rows] for v in (h_all, targets, coef))
                logits = (h @ w.T).float()
                lse = torch.logsumexp(logits, dim=-1)
                loss += ((lse - logits.gather(1, t[:, None]).squeeze(1)) * c).sum()
                if need_h or need_w:  # d loss / d logits = (softmax - one_hot) * coef, computed in place
                    probs = logits.sub_(lse[:, None]).exp_()
                    probs[torch.arange(len(t), device=t.device), t] -= 1
                    g = probs.mul_(c[:, None]).to(dtype)
                    if need_h:
                        grad_h[start:start + chunk_rows] = g @ w
                    if need_w:
                        grad_w += (g.T @ h).float()
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        scaled = [None if g is None else g * grad_loss for g in (grad_h, grad_w)]
        return *scaled, None, None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          token_weights: torch.Tensor | None = None, chunk_rows: int = 1024) -> torch.Tensor:
    """`F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100)` without the full logits.

    hidden (..., dim), weight (vocab, dim), targets (...) with -100 for ignored positions. Without
    `token_weights` the result is the mean over the targets that are not ignored; with a float
    `token_weights` (...) it is sum(loss_i * w_i) / sum(w). Rows whose loss has no weight (padding, an SFT
    prompt) are skipped: they add nothing to the loss or its gradients. Under autocast the matmuls run in
    the autocast dtype, like `nn.Linear`; the softmax is fp32 either way."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    kept = targets != -100
    if token_weights is None:
        coef = kept / kept.sum()
    else:
        w = token_weights.reshape(-1).float()
        coef = w * kept / w.sum().clamp_min(1e-8)
    rows = coef.nonzero().squeeze(1)
    if len(rows) < len(coef):
        hidden, targets, coef = hidden[rows], targets[rows], coef[rows]
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden, weight, targets, coef, dtype, chunk_rows, need_grad)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class KVCache:
    """Preallocated keys/values for every layer: (layers, batch, kv_heads, max_len, head_dim)."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        max_len = max_len or cfg.max_seq_len
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        self.max_len = max_len

    def reset(self) -> None:
        self.length = 0


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        else:
            start, end = cache.length, cache.length + T
            cache.k[layer, :B, :, start:end] = k
            cache.v[layer, :B, :, start:end] = v
            k, v = cache.k[layer, :B, :, :end], cache.v[layer, :B, :, :end]
            if T == 1:  # one new token sees everything cached: no mask needed
                mask = None
            else:  # a prompt chunk after a cached prefix: causal within the chunk, full over the prefix
                mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Parameter names follow HF Llama (`model.layers.N.self_attn.q_proj.weight`, ...) minus the
    `model.` prefix, so `hf_state_dict()` is a rename, not a conversion."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg)
        # not saved in checkpoints: derived from the config
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # scale residual projections by depth (GPT-2)
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights counted once

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, loss_mask: torch.Tensor | None = None,
                last_only: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Returns (logits, None), or (None, loss) when `targets` are given. With `cache`, positions
        continue from `cache.length` and the cache advances by T. `targets` uses -100 for ignored
        positions; `loss_mask` (0/1) further restricts the loss (SFT trains on assistant tokens only); a
        float `loss_mask` weights each token instead. `last_only` computes logits for the last position."""
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        cos = self.rope_cos[start:start + T][None, None]
        sin = self.rope_sin[start:start + T][None, None]
        x = self.embed_tokens(input_ids)
        for i, block in enumerate(self.layers):
            if self.cfg.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, i)
        if cache is not None:
            cache.length += T
        x = self.norm(x)
        if targets is not None:  # training and evaluation want the loss only: never build the logits
            if loss_mask is not None:
                targets = targets.masked_fill(loss_mask == 0, -100)
            weights = loss_mask if loss_mask is not None and loss_mask.is_floating_point() else None
            return None, chunked_cross_entropy(x, self.lm_head.weight, targets, weights)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x), None

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        p = self.embed_tokens.weight
        return KVCache(self.cfg, batch_size, max_len, dtype=p.dtype, device=p.device)

    @torch.inference_mode()
    def generate(self, prompt: list[int], max_new_tokens: int, stop_ids: tuple[int, ...] = (),
                 temperature: float = 0.0, top_k: int | None = None, seed: int | None = None) -> list[int]:
        """Minimal sampler for quick samples and tests; the runtime has the full one."""
        budget = min(max_new_tokens, self.cfg.max_seq_len - len(prompt))
        cache = self.new_cache(1, len(prompt) + max(budget, 0))
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        logits, _ = self(torch.tensor([prompt], device=self.embed_tokens.weight.device), cache=cache, last_only=True)
        out: list[int] = []
        for _ in range(budget):
            logits = logits[0, -1].float()
            if temperature <= 0:
                next_id = int(logits.argmax())
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = int(torch.multinomial(F.softmax(logits, -1), 1, generator=gen))
            if next_id in stop_ids:
                break
            out.append(next_id)
            if len(out) == budget:
                break
            logits, _ = self(torch.tensor([[next_id]], device=logits.device), cache=cache, last_only=True)
        return out


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """State dict with HF `LlamaForCausalLM` names (the tied lm_head is kept, HF expects the key)."""
    sd = {}
    for k, v in model.state_dict().items():
        sd[k if k == "lm_head.weight" else f"model.{k}"] = v
    return sd


def hf_config_dict(cfg: ModelConfig, bos_id: int = 1, eos_id: int = 2) -> dict:
    """The `config.json` fields of an equivalent HF `LlamaConfig` (`Qwen2Config` for q/k/v biases without an o_proj
    bias, Qwen2's layout)."""
    qwen2 = cfg.qkv_bias and not cfg.o_bias
    if qwen2 and cfg.mlp_bias:
        raise ValueError("q/k/v biases with MLP biases but no o_proj bias is neither a Llama nor a Qwen2 model")
    if cfg.qkv_bias != cfg.o_bias and not qwen2:
        raise ValueError("an o_proj bias without q/k/v biases is neither a Llama nor a Qwen2 model")
    out = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=cfg.vocab_size,
               hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden, num_hidden_layers=cfg.n_layers,
               num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
               max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
               tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", attention_bias=cfg.o_bias,
               mlp_bias=cfg.mlp_bias, bos_token_id=bos_id, eos_token_id=eos_id, torch_dtype="float32")
    if cfg.rope_scaling == "linear":
        out["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_factor}
    elif cfg.rope_scaling == "llama3":
        out["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_factor,
                               "low_freq_factor": cfg.rope_low_freq_factor,
                               "high_freq_factor": cfg.rope_high_freq_factor,
                               "original_max_position_embeddings": cfg.rope_original_max_seq_len}
    if qwen2:
        out.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False)
        for key in ("attention_bias", "mlp_bias"):
            out.pop(key)  # Qwen2 always has q/k/v biases and no others
    return out
