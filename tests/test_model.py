"""The model: sizes of the presets, KV-cache decoding, HF Llama equivalence, checkpoint files."""

import pickle

import pytest
import torch

from source.checkpoint import load_model, read_checkpoint, save_model
from source.config import ModelConfig, model_config, split_overrides, train_config
from source.model import Transformer, hf_config_dict, hf_state_dict


def build_on_meta(preset: str) -> Transformer:
    with torch.device("meta"):
        return Transformer(model_config(preset))


def test_preset_parameter_counts():
    assert build_on_meta("tiny").num_params() < 1_000_000
    assert 7.5e6 < build_on_meta("small").num_params() < 8.5e6
    assert 0.65e9 < build_on_meta("blueprint-700m").num_params() < 0.75e9


@pytest.fixture(scope="module")
def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(model_config("tiny", ["vocab_size=1000"])).eval()


def test_incremental_decoding_matches_full_forward(tiny_model):
    x = torch.randint(0, 1000, (2, 48))
    full, _ = tiny_model(x)
    cache = tiny_model.new_cache(batch_size=2, max_len=64)
    first, _ = tiny_model(x[:, :20], cache=cache)
    steps = [tiny_model(x[:, t:t + 1], cache=cache)[0] for t in range(20, 48)]
    assert cache.length == 48
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), full, atol=1e-5, rtol=1e-5)
    cache.reset()  # prompt in two chunks: causal within the second chunk, full view of the first
    a, _ = tiny_model(x[:, :7], cache=cache)
    b, _ = tiny_model(x[:, 7:], cache=cache)
    torch.testing.assert_close(torch.cat([a, b], dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_is_preallocated_and_reused(tiny_model):
    cache = tiny_model.new_cache(batch_size=1, max_len=32)
    k_ptr = cache.k.data_ptr()
    tiny_model(torch.tensor([[1, 2, 3]]), cache=cache)
    tiny_model(torch.tensor([[4]]), cache=cache)
    assert cache.k.data_ptr() == k_ptr and cache.length == 4
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny_model(torch.zeros(1, tiny_model.cfg.max_seq_len + 1, dtype=torch.long))


def test_state_dict_maps_onto_hf_llama(tiny_model):
    transformers = pytest.importorskip("transformers")
    cfg = {k: v for k, v in hf_config_dict(tiny_model.cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    result = hf.load_state_dict(hf_state_dict(tiny_model), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randint(0, 1000, (2, 33))
    with torch.no_grad():
        ours, _ = tiny_model(x)
        theirs = hf(x).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    prompt = [1, 17, 400, 12, 9]
    ours_greedy = tiny_model.generate(prompt, max_new_tokens=20)
    theirs_greedy = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(prompt):].tolist()
    assert ours_greedy == theirs_greedy


def test_loss_mask_restricts_the_loss(tiny_model):
    x = torch.randint(0, 1000, (1, 16))
    y = torch.randint(0, 1000, (1, 16))
    mask = torch.zeros(1, 16, dtype=torch.long)
    mask[0, 8:] = 1
    _, masked = tiny_model(x, y, loss_mask=mask)
    _, manual = tiny_model(x, torch.where(mask.bool(), y, -100))
    torch.testing.assert_close(masked, manual)


def test_checkpoint_round_trip(tmp_path, tiny_model):
    path = tmp_path / "model.pth"
    save_model(path, tiny_model, tokenizer_sha256="ab" * 32, kind="pretrain", step=7)
    loaded, ckpt = load_model(path)
    assert ckpt["step"] == 7 and ckpt["tokenizer"] == "ab" * 32
    assert "lm_head.weight" not in ckpt["model"]  # tied weights stored once
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    x = torch.randint(0, 1000, (1, 10))
    torch.testing.assert_close(loaded.eval()(x)[0], tiny_model(x)[0])
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        read_checkpoint(tmp_path / "missing.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="truncated.pth: not a readable checkpoint"):
        read_checkpoint(truncated)

    class Payload:  # a pickle that would run code on a non-weights_only load
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pth"
    torch.save({"format": "supermix-checkpoint-v1", "config": {}, "model": Payload(), "tokenizer": ""}, evil,
               pickle_module=pickle)
    with pytest.raises(ValueError, match="evil.pth"):
        read_checkpoint(evil)
    other = tmp_path / "other.pth"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a Supermix checkpoint"):
        read_checkpoint(other)


def test_config_overrides_and_validation():
    cfg = model_config("small", ["n_layers=4", "rope_theta=5e5", "gradient_checkpointing=true"])
    assert (cfg.n_layers, cfg.rope_theta, cfg.gradient_checkpointing) == (4, 5e5, True)
    assert split_overrides(["dim=128", "lr=1e-3"]) == (["dim=128"], ["lr=1e-3"])
    with pytest.raises(ValueError, match="unknown setting 'nope'"):
        split_overrides(["nope=1"])
    with pytest.raises(ValueError, match="field 'max_steps'"):
        train_config("tiny", ["max_steps=many"])
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(dim=100, n_heads=8)
    with pytest.raises(ValueError, match="unknown preset"):
        model_config("huge")


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = Transformer(model_config("tiny", ["vocab_size=300"]))
    ckpt = Transformer(model_config("tiny", ["vocab_size=300", "gradient_checkpointing=true"]))
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randint(0, 300, (2, 16))
    for m in (plain, ckpt):
        m.train()
        m(x, x)[1].backward()
    torch.testing.assert_close(plain.embed_tokens.weight.grad, ckpt.embed_tokens.weight.grad)
