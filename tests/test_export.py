"""`builder export` on the tiny model: layout, gates, ONNX/torch parity, batching, failure safety, CLI."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from builder.cli import main
from source.files import sha256_file

pytestmark = pytest.mark.slow


def test_export_layout_manifest_and_gates(tiny_export):
    manifest = json.loads((tiny_export / "manifest.json").read_text())
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "onnx/model.onnx",
                 "onnx/model_quantized.onnx", "onnx/model_q4.onnx", "onnx/model_gqa_quantized.onnx"):
        assert (tiny_export / name).is_file(), name
    for f in manifest["files"]:  # every file listed with its real size and hash
        path = tiny_export / f["path"]
        assert path.stat().st_size == f["bytes"] and sha256_file(path) == f["sha256"], f["path"]
    assert json.loads((tiny_export / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert "chat_template" in json.loads((tiny_export / "tokenizer_config.json").read_text())
    required = [g for g in manifest["gates"] if g["required"]]
    names = " | ".join(g["name"] for g in required)
    for expected in ("ONNX fp32 greedy", "q8 bits/byte", "q8 size", "q8-gqa bits/byte", "q8-gqa size",
                     "HF AutoModelForCausalLM logits",
                     "HF greedy", "chat template", "optimum"):
        assert expected in names
    assert all(g["passed"] for g in required), manifest["gates"]
    assert {"torch_fp32_tok_s", "onnx_fp32_tok_s", "onnx_int8_tok_s", "onnx_int8_gqa_tok_s"} <= set(manifest["speed"])


def test_tied_embedding_stored_once(tiny_export):
    from safetensors import safe_open

    with safe_open(tiny_export / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    import onnx

    graph = onnx.load(tiny_export / "onnx" / "model.onnx").graph
    vocab_sized = [i.name for i in graph.initializer if 1000 in i.dims]
    assert len(vocab_sized) == 1, vocab_sized


def test_onnx_backend_streams_what_torch_streams(tiny_export, tiny_base, tiny_workspace):
    from runtime_python.backends import OnnxBackend, TorchBackend
    from runtime_python.chat import generate_stream
    from runtime_python.generation import GenerationConfig

    gen = GenerationConfig(max_new_tokens=40, temperature=0.0)
    messages = [{"role": "user", "content": "What is a list comprehension?"}]
    torch_backend = TorchBackend.load(tiny_base, tiny_workspace["tokenizer"])
    onnx_backend = OnnxBackend(tiny_export, "fp32")
    texts = ["".join(ev for ev in generate_stream(b, messages, gen) if isinstance(ev, str))
             for b in (torch_backend, onnx_backend)]
    assert texts[0] == texts[1] and texts[0]


def _onnx_runner(path, cfg):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(ids, mask, positions, past=None):
        feeds = {"input_ids": np.array(ids, np.int64), "attention_mask": np.array(mask, np.int64),
                 "position_ids": np.array(positions, np.int64)}
        for i in range(cfg.n_layers):
            for j, t in enumerate(("key", "value")):
                feeds[f"past_key_values.{i}.{t}"] = (past[2 * i + j] if past is not None else
                                                     np.zeros((len(ids), cfg.n_kv_heads, 0, cfg.head_dim), np.float32))
        out = session.run(None, feeds)
        return out[0], out[1:]
    return run


@pytest.mark.parametrize("graph", ["contrib", "torch"])
def test_onnx_graph_matches_torch_with_batches_padding_and_past(graph, tiny_base, tmp_path):
    """Both graphs: batched rows and KV-cache steps equal the PyTorch model. Padding: the torch graph
    takes left padding (transformers.js batches), the contrib graph right padding (GroupQueryAttention)."""
    import torch

    from builder.export import export_onnx
    from source.checkpoint import load_model

    model, _ = load_model(tiny_base)
    model.eval()
    export_onnx(model, tmp_path / "model.onnx", graph)
    run = _onnx_runner(tmp_path / "model.onnx", model.cfg)
    ids = [10, 11, 12, 13, 14, 15]
    with torch.no_grad():
        reference = model(torch.tensor([ids]))[0][0].numpy()
    logits, past = run([ids[:4]], [[1] * 4], [[0, 1, 2, 3]])  # prompt, then two cached steps
    assert np.abs(logits[0] - reference[:4]).max() < 1e-4
    for pos in (4, 5):
        logits, past = run([[ids[pos]]], [[1] * (pos + 1)], [[pos]], past)
        assert np.abs(logits[0, -1] - reference[pos]).max() < 1e-4
    assert past[0].shape == (1, model.cfg.n_kv_heads, 6, model.cfg.head_dim)
    if graph == "torch":
        batch, _ = run([[0, 0, 10, 11, 12, 13], [5, 6, 7, 8, 9, 10]], [[0, 0, 1, 1, 1, 1], [1] * 6],
                       [[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]])
        row = batch[0, 2:]
    else:
        batch, _ = run([[10, 11, 12, 13, 0, 0], [5, 6, 7, 8, 9, 10]], [[1, 1, 1, 1, 0, 0], [1] * 6],
                       [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]])
        row = batch[0, :4]
    assert np.abs(row - reference[:4]).max() < 1e-4
    with torch.no_grad():
        other = model(torch.tensor([[5, 6, 7, 8, 9, 10]]))[0][0].numpy()
    assert np.abs(batch[1] - other).max() < 1e-4


def test_contrib_int8_keeps_one_table_and_gathers_int8_rows(tiny_export):
    import onnx

    manifest = json.loads((tiny_export / "manifest.json").read_text())
    assert manifest["onnx_graph"] == "torch"  # the portable graph under the standard names
    assert not any(n.op_type == "GroupQueryAttention" for n in onnx.load(tiny_export / "onnx" / "model.onnx").graph.node)
    graph = onnx.load(tiny_export / "onnx" / "model_gqa_quantized.onnx").graph
    vocab_sized = [i.name for i in graph.initializer if 1000 in i.dims]
    assert vocab_sized == ["lm_head_t_quantized"]
    assert sum(n.op_type == "GroupQueryAttention" for n in graph.node) == 2  # one per layer
    gather = next(n for n in graph.node if n.op_type == "Gather" and n.input[0] == "lm_head_t_quantized")
    assert any(n.op_type == "DequantizeLinear" and n.input[0] == gather.output[0] for n in graph.node)


def test_failed_gate_publishes_nothing(tiny_base, tiny_workspace, tmp_path, monkeypatch):
    from builder import export_gates
    from builder.export import export_model

    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("the previous export")
    monkeypatch.setattr(export_gates, "INT8_SIZE_RATIO", 0.01)  # an impossible bar: int8 can't be 1% of fp32
    with pytest.raises(export_gates.GateError, match="size vs fp32"):
        export_model(tiny_base, tiny_workspace["tokenizer"], out, log=lambda _: None)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # the old export is untouched


def test_cli_export_prints_gate_table_and_chat_runs_on_onnx(tiny_base, tiny_workspace, tmp_path):
    out = tmp_path / "cli-export"
    result = CliRunner().invoke(main, ["export", "--model", str(tiny_base), "--tokenizer",
                                       str(tiny_workspace["tokenizer"]), "--out", str(out), "--no-index",
                                       "--data", str(tmp_path / "no-corpus")])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and "FAIL" not in result.output and "decode tokens/s" in result.output
    from runtime_python.cli import main as supermix

    asked = CliRunner().invoke(supermix, ["ask", "What is a tuple?", "--backend", "onnx", "--model", str(out),
                                          "--dtype", "int8", "--no-retrieval", "--temperature", "0",
                                          "--max-tokens", "8", "--json"])
    assert asked.exit_code == 0, asked.output
    assert json.loads(asked.output)["model"] == "cli-export"
    bad = CliRunner().invoke(main, ["export", "--model", str(tmp_path / "missing.pth"), "--out", str(out)])
    assert bad.exit_code != 0 and "missing.pth" in bad.output and "Traceback" not in bad.output


def test_int8_runtime_prefers_the_gqa_file_and_it_answers_like_the_portable_one(tiny_export):
    from runtime_python.cli import _export_backend
    from runtime_python.onnx_backend import OnnxBackend

    gqa = _export_backend(str(tiny_export), "cpu", "int8")
    assert gqa.dtype == "q8-gqa"
    portable = OnnxBackend(tiny_export, "q8")
    ids = [1, 10, 11, 12, 13, 14, 15, 16]
    # both int8, quantized alike per tensor; the gqa file also quantizes the lm_head, so compare loosely
    a, b = gqa.prefill(ids), portable.prefill(ids)
    assert (a - b).abs().max() < 0.5 and int(a.argmax()) == int(b.argmax())
