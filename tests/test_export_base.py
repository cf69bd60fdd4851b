"""`builder export` of a version fine-tuned from an imported Hugging Face base: import -> sft --lora -> export, every
gate on the exported folder (transformers logits and greedy tokens, its chat template, ONNX vs torch, int8, GGUF
read-back), the base's architecture and tokenizer kept, `supermix ask --backend onnx` on the export answering with
the `.pth`'s greedy tokens, and the site built from it replying the same in Chromium. Tiny random Llama (untied, head_dim 64 != hidden/heads, linear rope scaling) and Qwen2 (tied, q/k/v
biases) folders with a byte-level BPE tokenizer and a ChatML template (tests/hf_folders.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hf_folders import byte_level_tokenizer, model_folder
from test_sft import synthetic_examples

from builder.cli import main as builder
from runtime_python.cli import main as supermix

QUESTION = "What is zorblax?"
# wide enough (and a short enough rotary table) that the int8 files stay under 30% of the fp32 one
WIDE = {"hidden_size": 128, "intermediate_size": 384, "max_position_embeddings": 384}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_index):
    """Both bases imported, fine-tuned with LoRA and exported (--q4, the retrieval index): {name: (root, vid)}."""
    root = tmp_path_factory.mktemp("exportbase")
    tok = byte_level_tokenizer(root / "tok")
    bases = {"llama": model_folder(root / "llama", tok, tied=False, head_dim=64, seed=3, perturb=True,
                                   extra={**WIDE, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
             "qwen": model_folder(root / "qwen", tok, model_type="qwen2", seed=4, perturb=True, extra=WIDE)}
    data = root / "sft"
    data.mkdir()
    for name, n, seed in (("train.jsonl", 24, 0), ("test.jsonl", 4, 1)):
        (data / name).write_text("".join(json.dumps(e) + "\n" for e in synthetic_examples(n, seed)))
    models, out = root / "models", {}
    for name, folder in bases.items():
        result = CliRunner().invoke(builder, ["base", "--root", str(models), "import", str(folder), "--name", name])
        assert result.exit_code == 0, result.output
        result = CliRunner().invoke(builder, [
            "sft", "--base", name, "--models-root", str(models), "--data", str(data), "--out", str(root / f"run-{name}"),
            "--preset", "tiny", "--set", "max_steps=4", "--set", "batch_size=2", "--set", "seq_len=192", "--set",
            "precision=fp32", "--set", "lr=3e-3", "--samples", "0", "--lora", "--lora-rank", "4"])
        assert result.exit_code == 0, result.output
        vid = json.loads((models / "registry.json").read_text())["versions"][-1]["id"]
        result = CliRunner().invoke(builder, ["export", "--model", vid, "--root", str(models), "--out",
                                              str(root / f"export-{name}"), "--q4", "--gguf", "--index", str(tiny_index),
                                              "--data", str(root / "no-corpus")])
        assert result.exit_code == 0, result.output
        assert "PASS" in result.output and "FAIL" not in result.output
        out[name] = (root, vid, bases[name])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "qwen"])
def test_export_keeps_the_base_architecture_and_tokenizer_and_passes_every_gate(name, exported):
    root, vid, base = exported[name]
    folder = root / f"export-{name}"
    config, theirs = (json.loads(p.read_text()) for p in (folder / "config.json", base / "config.json"))
    theirs.setdefault("head_dim", theirs["hidden_size"] // theirs["num_attention_heads"])  # Qwen2Config has none
    for key in ("model_type", "architectures", "hidden_size", "num_key_value_heads", "head_dim", "rope_theta",
                "tie_word_embeddings", "vocab_size", "max_position_embeddings"):
        assert config.get(key) == theirs.get(key), key
    if name == "llama":
        assert config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0} and config["head_dim"] == 64
        assert config["attention_bias"] is False
    else:
        assert config["model_type"] == "qwen2" and "attention_bias" not in config
    # the base's tokenizer.json and licence as they are, its template in tokenizer_config.json
    assert (folder / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert (folder / "LICENSE").is_file() and not (folder / "tokenizer.model").exists()
    assert not (folder / "chat_template.jinja").exists()
    template = json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
    assert template == (base / "chat_template.jinja").read_text()
    generation = json.loads((folder / "generation_config.json").read_text())
    tok = json.loads((base / "tokenizer_config.json").read_text())
    assert generation["eos_token_id"][0] == config["eos_token_id"] and len(generation["eos_token_id"]) > 1
    assert tok["eos_token"] == "<|im_end|>"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["tokenizer"] == "hf" and manifest["model_version"] == vid
    required = [g for g in manifest["gates"] if g["required"]]
    names = " | ".join(g["name"] for g in required)
    for expected in ("ONNX fp32 greedy", "q8 bits/byte", "q8 size", "q8-gqa bits/byte", "HF AutoModelForCausalLM "
                     "logits", "HF greedy", "HF AutoTokenizer chat template == ours", "gguf read-back"):
        assert expected in names, expected
    assert all(g["passed"] for g in required), manifest["gates"]
    optimum = next(g for g in manifest["gates"] if g["name"].startswith("optimum"))
    # optimum-onnx sizes the cache from hidden_size / heads: it runs the Qwen2 export, not a head_dim-64 Llama
    assert optimum["passed"] is (None if name == "llama" else True), optimum
    assert (folder / "onnx" / "model_q4.onnx").is_file() and (folder / "index" / "meta.json").is_file()
    assert (folder / "gguf" / "model-q8_0.gguf").is_file() and 'stop "<|im_end|>"' in (folder / "gguf" / "Modelfile").read_text()
    # `builder gguf` on the version writes the same kind of files on its own
    result = CliRunner().invoke(builder, ["gguf", "--model", vid, "--root", str(root / "models"), "--out",
                                          str(root / f"gguf-{name}"), "--dtype", "f32"])
    assert result.exit_code == 0, result.output
    assert (root / f"gguf-{name}" / "model-f32.gguf").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "qwen"])
def test_supermix_on_the_export_answers_with_the_checkpoint_greedy_tokens(name, exported, monkeypatch):
    from source.checkpoint import load_model
    from source.hf_tokenizer import HFTokenizer
    from source.prompt import build_prompt
    from source.sft_data import DEFAULT_SYSTEM_PROMPT

    root, vid, _ = exported[name]
    version = root / "models" / "versions" / vid
    model, _ = load_model(version / "model.pth")
    tok = HFTokenizer.load(version / "tokenizer")
    prompt = build_prompt(tok, [{"role": "user", "content": QUESTION}], [], DEFAULT_SYSTEM_PROMPT, 24,
                          model.cfg.max_seq_len).ids
    stops = tuple({tok.eos_id, tok.bos_id, *tok.special_ids.values()} - {None})
    expected = tok.decode(model.generate(prompt, 24, stop_ids=stops))
    assert len(expected) >= 3, "the model stopped at once: pick another seed for a real check"
    monkeypatch.chdir(root)
    result = CliRunner().invoke(supermix, ["ask", QUESTION, "--model", str(root / f"export-{name}"), "--backend",
                                           "onnx", "--no-retrieval", "-t", "0", "--max-tokens", "24", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["answer"] == expected


def test_large_weights_go_to_external_data_with_transformers_js_names(tmp_path):
    """A file over EXTERNAL_DATA_BYTES keeps its weights in <file>_data (forced here on a small model): fp32 and
    int8 both load in onnxruntime from there and give the model's logits."""
    import onnxruntime as ort

    from builder.export import export_onnx, quantize_int8
    from source.config import ModelConfig
    from source.model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                                    max_seq_len=64, tie_embeddings=False, qkv_bias=True)).eval()
    export_onnx(model, tmp_path / "model.onnx", external=True)
    quantize_int8(tmp_path / "model.onnx", tmp_path / "model_quantized.onnx", external=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx_data", "model_quantized.onnx",
                                                          "model_quantized.onnx_data"]
    assert (tmp_path / "model.onnx").stat().st_size < 100_000 < (tmp_path / "model.onnx_data").stat().st_size
    ids = np.array([[5, 17, 200, 12, 9, 33]])
    with torch.no_grad():
        want = model(torch.from_numpy(ids))[0][0].numpy()
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(6)[None]}
    feeds |= {f"past_key_values.{i}.{t}": np.zeros((1, 2, 0, 16), np.float32) for i in range(2) for t in ("key", "value")}
    for name, tolerance in (("model.onnx", 1e-4), ("model_quantized.onnx", 0.1)):
        got = ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0][0]
        assert np.abs(got - want).max() < tolerance * max(1.0, np.abs(want).max()), name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "qwen"])
def test_site_of_the_export_replies_with_onnx_backend_tokens_in_chromium(name, exported, tmp_path):
    """`builder site` on the export, in headless Chromium: the page renders the model's own chat template (sources
    folded into the question) and its greedy reply equals runtime_python's on the same ONNX file and index."""
    from test_site import CHROMIUM, FLAGS, LOAD_S, _reference, _wait, needs_npm, serve

    from builder.site import build_site

    if needs_npm.args[0] or not CHROMIUM.exists():
        pytest.skip("needs web_static/node_modules and Debian chromium")
    root, _, _ = exported[name]
    export = root / f"export-{name}"
    build_site(export, tmp_path / "site")
    site = json.loads((tmp_path / "site" / "site.json").read_text())
    assert site["chat"]["fold_context"] and "<|im_end|>" in site["end_tokens"]
    from playwright.sync_api import sync_playwright

    with serve(tmp_path / "site") as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        page = browser.new_page()
        page.route("**/*", lambda r: r.continue_() if r.request.url.startswith((base, "data:", "blob:")) else r.abort())
        page.goto(base + "?temperature=0&max_new_tokens=24")
        _wait(page, "window.supermix && (window.supermix.ready || window.supermix.errors.length)", LOAD_S)
        assert page.evaluate("window.supermix.errors") == []
        page.fill("#prompt", "What is a closure?")
        page.click("#send")
        _wait(page, "window.supermix.replies.length >= 1 || window.supermix.errors.length")
        got = page.evaluate("window.supermix.replies[0]")
        # the int8 file loads and answers too (wasm's int8 kernels round unlike native onnxruntime's: not compared)
        page.goto(base + "?temperature=0&max_new_tokens=8&dtype=q8")
        _wait(page, "window.supermix && (window.supermix.ready || window.supermix.errors.length)", LOAD_S)
        page.fill("#prompt", "What is a closure?")
        page.click("#send")
        _wait(page, "window.supermix.replies.length >= 1 || window.supermix.errors.length")
        assert page.evaluate("[window.supermix.errors, window.supermix.dtype]") == [[], "q8"]
        assert page.evaluate("window.supermix.replies[0].completion_tokens") > 0
        browser.close()
    want = _reference(export, [{"role": "user", "content": "What is a closure?"}], 24)
    assert want["sources"] and len(want["token_ids"]) >= 3, want
    assert got["token_ids"] == want["token_ids"] and got["text"] == want["text"]
    assert [s["id"] for s in got["sources"]] == want["sources"]
    assert (got["prompt_tokens"], got["finish_reason"]) == (want["prompt_tokens"], want["finish_reason"])
