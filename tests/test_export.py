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
                 "onnx/model_quantized.onnx", "onnx/model_q4.onnx"):
        assert (tiny_export / name).is_file(), name
    for f in manifest["files"]:  # every file listed with its real size and hash
        path = tiny_export / f["path"]
        assert path.stat().st_size == f["bytes"] and sha256_file(path) == f["sha256"], f["path"]
    assert json.loads((tiny_export / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert "chat_template" in json.loads((tiny_export / "tokenizer_config.json").read_text())
    required = [g for g in manifest["gates"] if g["required"]]
    names = " | ".join(g["name"] for g in required)
    for expected in ("ONNX fp32 greedy", "q8 bits/byte", "q8 size", "HF AutoModelForCausalLM logits",
                     "HF greedy", "chat template", "optimum"):
        assert expected in names
    assert all(g["passed"] for g in required), manifest["gates"]
    assert {"torch_fp32_tok_s", "onnx_fp32_tok_s", "onnx_int8_tok_s"} <= set(manifest["speed"])


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


def test_onnx_graph_handles_batches_padding_and_past(tiny_export):
    """transformers.js feeds batches with left padding: a padded row must equal its unpadded run."""
    import onnxruntime as ort

    cfg = json.loads((tiny_export / "config.json").read_text())
    L, KV, D = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"]
    session = ort.InferenceSession(str(tiny_export / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])

    def run(ids, mask, positions, past_len=0):
        feeds = {"input_ids": np.array(ids, np.int64), "attention_mask": np.array(mask, np.int64),
                 "position_ids": np.array(positions, np.int64)}
        for i in range(L):
            for t in ("key", "value"):
                feeds[f"past_key_values.{i}.{t}"] = np.zeros((len(ids), KV, past_len, D), np.float32)
        return session.run(None, feeds)

    alone = run([[10, 11, 12, 13]], [[1, 1, 1, 1]], [[0, 1, 2, 3]])
    batch = run([[0, 0, 10, 11, 12, 13], [5, 6, 7, 8, 9, 10]], [[0, 0, 1, 1, 1, 1], [1] * 6],
                [[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]])
    assert np.abs(batch[0][0, 2:] - alone[0][0]).max() < 1e-4
    assert batch[1].shape == (2, KV, 6, D)  # present = past (0) + 6 new positions


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
