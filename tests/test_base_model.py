"""`load_base`: an imported Hugging Face base runs on our own Transformer and TorchBackend with the logits and
greedy tokens of transformers' LlamaForCausalLM / Qwen2ForCausalLM. Tiny random folders (tests/hf_folders.py),
sharded, with random biases and norms: tied, untied with head_dim != hidden/heads, Qwen2 (q/k/v biases), Llama
with every bias and llama3 rope scaling, Llama with linear rope scaling."""

from __future__ import annotations

import json

import pytest
import torch
from hf_folders import byte_level_tokenizer, model_folder

from runtime_python.backends import TorchBackend
from source.base_model import load_base
from source.hf_base import BaseError, import_base
from source.registry import Registry

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
SPECS = {
    "llama-tied": dict(),
    "llama-untied-hd32": dict(tied=False, head_dim=32),
    "qwen2": dict(model_type="qwen2", tied=False),
    "llama-bias-llama3": dict(tied=False, extra={"attention_bias": True, "mlp_bias": True, "rope_scaling": LLAMA3}),
    "llama-linear": dict(extra={"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tok = byte_level_tokenizer(tmp_path_factory.mktemp("tok") / "tok")
    root = tmp_path_factory.mktemp("bases")
    return {name: model_folder(root / name, tok, seed=i, perturb=True, **spec)
            for i, (name, spec) in enumerate(SPECS.items())}


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", list(SPECS))
def test_logits_and_greedy_tokens_equal_transformers(name, folders):
    folder = folders[name]
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    model, tok, entry = load_base(folder)
    hf = _hf(folder)
    assert entry is None and model.num_params() == hf.num_parameters()
    assert model.cfg.tie_embeddings == SPECS[name].get("tied", True)
    ids = tok.encode("def append(self, item):\n    naïve café — " * 12)[:300]
    with torch.no_grad():
        ours, theirs = model(torch.tensor([ids]))[0], hf(torch.tensor([ids])).logits
    assert (ours - theirs).abs().max().item() < 2e-5
    prompt, _ = tok.encode_chat([{"role": "user", "content": "What does list.append do?"}])
    greedy = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=30, eos_token_id=None, pad_token_id=0)[0, len(prompt):]
    assert model.generate(prompt, max_new_tokens=30) == greedy.tolist()
    backend = TorchBackend(model, tok, name=name)  # the runtime's batched forward and prompt cache
    logits, got = backend.prefill(prompt), []
    for _ in range(30):
        got.append(int(logits.argmax()))
        logits = backend.decode(got[-1])
    assert got == greedy.tolist()


def test_registered_base_is_rehashed_and_cast(folders, tmp_path):
    import shutil

    folder = shutil.copytree(folders["qwen2"], tmp_path / "copy")
    registry = Registry(tmp_path / "models")
    import_base(folder, registry, name="q")
    model, tok, entry = load_base("q", registry, dtype=torch.bfloat16, max_seq_len=128)
    assert entry["name"] == "q" and model.cfg.max_seq_len == 128 and model.cfg.qkv_bias and not model.cfg.o_bias
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and model.rope_cos.dtype == torch.float32
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(BaseError, match=rf"{shard.name}: sha256 differs from the registry; the folder changed"):
        load_base("q", registry)
    with pytest.raises(ValueError, match="no base 'nope'"):
        load_base("nope", registry)


def test_unsupported_rope_scaling_is_named(folders, tmp_path):
    import shutil

    folder = shutil.copytree(folders["llama-tied"], tmp_path / "yarn")
    config = json.loads((folder / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BaseError, match=r"config.json: rope_scaling type 'yarn' is not supported \(linear, llama3\)"):
        load_base(folder)


@pytest.mark.parametrize("name", ["qwen2", "llama-bias-llama3"])
def test_serve_batches_a_base_like_running_alone(name, folders):
    """`supermix serve`'s engine over a base: requests sharing steps get the logits they get alone, exactly."""
    import threading

    from runtime_python.batching import Engine

    model, tok, _ = load_base(folders[name])
    prompts = [tok.encode(text)[:150] for text in ("hi", "What does list.append do? " * 6, "naïve café — " * 20)]

    def steps(backend, ids):
        out = [backend.prefill(ids)]
        for _ in range(8):
            out.append(backend.decode(int(out[-1].argmax())))
        return out

    alone = [steps(TorchBackend(model, tok), ids) for ids in prompts]
    engine = Engine(TorchBackend(model, tok), slots=2, chunk=16, step_tokens=32)
    got: dict[int, list] = {}

    def worker(i: int) -> None:
        with engine.slot() as s:
            got[i] = steps(s, prompts[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    engine.close()
    for i in range(len(prompts)):
        assert all(torch.equal(a, b) for a, b in zip(alone[i], got[i])), f"request {i} differs from alone"
