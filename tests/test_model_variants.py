"""The base-model variants of ModelConfig (untied head, explicit head_dim, q/k/v, o_proj and MLP biases, "linear"
and "llama3" rope scaling) through every forward we have: `Transformer`, transformers' own Llama/Qwen2 classes
from `hf_config_dict` + `hf_state_dict`, `TorchBackend` (prefill, decode, a batched step), the export's
`OnnxForward` and the onnxruntime contrib graph. Random weights, random biases, a few hundred tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime_python.backends import TorchBackend
from source.config import ModelConfig, config_dict, estimate_params
from source.model import Transformer, hf_config_dict, hf_state_dict

BASE = dict(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, max_seq_len=256,
            norm_eps=1e-6, rope_theta=50000.0)
VARIANTS = {
    "untied-head_dim32": dict(tie_embeddings=False, head_dim_override=32),
    "qwen2-biases": dict(qkv_bias=True, tie_embeddings=False),
    "llama-all-biases": dict(qkv_bias=True, o_bias=True, mlp_bias=True),
    "llama3-rope": dict(rope_scaling="llama3", rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                        rope_original_max_seq_len=64, head_dim_override=32),
    "linear-rope": dict(rope_scaling="linear", rope_factor=2.0),
}


def random_model(**variant) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**BASE, **variant)).eval()
    with torch.no_grad():  # our init zeroes biases and sets norms to one: make both matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    return request.param, random_model(**VARIANTS[request.param])


def test_defaults_are_todays_model_and_configs():
    cfg = ModelConfig(**BASE)
    assert cfg.head_dim == 16 and set(config_dict(cfg)) == set(BASE) | {"tie_embeddings", "gradient_checkpointing"}
    assert "rope_scaling" not in hf_config_dict(cfg) and hf_config_dict(cfg)["attention_bias"] is False
    with pytest.raises(ValueError, match="rope_scaling='yarn'"):
        ModelConfig(**BASE, rope_scaling="yarn")


def test_transformers_gives_the_same_logits_and_greedy_tokens(variant):
    from transformers import AutoConfig, AutoModelForCausalLM

    name, model = variant
    assert estimate_params(model.cfg) == model.num_params()
    fields = hf_config_dict(model.cfg)
    assert fields["model_type"] == ("qwen2" if name == "qwen2-biases" else "llama")
    config = AutoConfig.for_model(**{k: v for k, v in fields.items() if k not in ("architectures", "torch_dtype")})
    hf = AutoModelForCausalLM.from_config(config).eval()
    result = hf.load_state_dict(hf_state_dict(model), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randint(0, 300, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(x)[0], hf(x).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    prompt = [5, 17, 200, 12, 9]
    greedy = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(prompt):].tolist()
    assert model.generate(prompt, max_new_tokens=24) == greedy


def test_torch_backend_equals_the_model(variant):
    _, model = variant
    ids = torch.randint(0, 300, (150,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        full = model(torch.tensor([ids]))[0][0]
    backend = TorchBackend(model, None)
    logits = backend.prefill(ids[:140])
    assert (logits - full[139]).abs().max().item() < 1e-4
    for pos in range(140, 150):
        logits = backend.decode(ids[pos])
        if pos < 149:
            assert (logits - full[pos]).abs().max().item() < 1e-4
    for dtype in ("bf16", "int8"):  # not exact, but close
        approx = TorchBackend(model, None, dtype=dtype).prefill(ids[:140])
        assert (approx - full[139]).abs().max().item() < 0.1 * full[139].abs().max().item(), dtype


def test_onnx_graphs_equal_the_model(variant):
    import onnxruntime as ort

    from builder.export import OnnxForward
    from source.onnx_graph import contrib_graph

    _, model = variant
    cfg = model.cfg
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)[0][0].numpy()
        past = [torch.zeros(1, cfg.n_kv_heads, 0, cfg.head_dim) for _ in range(2 * cfg.n_layers)]
        portable = OnnxForward(model)(ids, torch.ones_like(ids), torch.arange(40)[None], *past)[0][0].numpy()
    assert np.abs(portable - full).max() < 1e-4
    session = ort.InferenceSession(contrib_graph(model).SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((1, 40), np.int64),
             "position_ids": np.arange(40)[None]}
    feeds |= {f"past_key_values.{i}.{t}": np.zeros((1, cfg.n_kv_heads, 0, cfg.head_dim), np.float32)
              for i in range(cfg.n_layers) for t in ("key", "value")}
    assert np.abs(session.run(["logits"], feeds)[0][0] - full).max() < 1e-4
