"""`builder card` on a real tiny registry version: front matter parses, numbers match their sources,
no placeholder survives, the loss curve is a real PNG."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from builder.card import placeholders
from builder.cli import main
from source.registry import Registry

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def registry(tiny_base, tiny_workspace, tmp_path_factory) -> tuple[Registry, Path]:
    """v1 = the tiny pretrained run; v2 = a 'fine-tune' of it whose run.json names v1's run as its base,
    so v2 keeps both training logs; v2 has an eval.json with metrics and samples, and is the champion."""
    root = tmp_path_factory.mktemp("card")
    reg = Registry(root / "models")
    reg.add(tiny_base, tiny_workspace["tokenizer"], notes="tiny base")
    sft = root / "runs" / "sft"
    sft.mkdir(parents=True)
    shutil.copyfile(tiny_base, sft / "model.pth")
    run = json.loads((tiny_base.parent / "run.json").read_text())
    (sft / "run.json").write_text(json.dumps({**run, "parent_checkpoint": str(tiny_base), "base_step": 40}))
    (sft / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 10, "loss": 6.1, "tokens": 1000, "elapsed": 1.5}, {"step": 20, "loss": 5.7, "tokens": 2000,
                                                                    "elapsed": 3.0},
        {"step": 20, "val_loss": 5.9, "val_bpb": 2.75}]))
    metrics = {"val_bpb": 2.75, "grounded_qa": 0.125, "citation_accuracy": 0.5, "refusal_accuracy": 0.25}
    v2 = reg.add(sft / "model.pth", tiny_workspace["tokenizer"], parent="v1", metrics=metrics)
    (root / "models" / "versions" / v2.id / "eval.json").write_text(json.dumps({
        **metrics, "n_grounded": 8, "n_refusal": 4, "samples": [
            {"prompt": "What does json.dumps do?", "answer": "It returns None [1].", "sources": ["docstring:json"]},
            {"prompt": "Define ephemeral.", "answer": "Lasting a short time.", "sources": []}]}))
    reg.promote(v2.id)
    return reg, root


def front(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_card_numbers_come_from_the_registry_and_eval(registry, tmp_path):
    reg, _ = registry
    out = tmp_path / "card" / "README.md"
    result = CliRunner().invoke(main, ["card", "--root", str(reg.root), "--out", str(out),
                                       "--dataset-manifest", str(REPO / "datasets/manifests/default.json")])
    assert result.exit_code == 0, result.output
    text, v = out.read_text(), reg.get("champion")
    meta = front(text)
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "text-generation"
    assert meta["language"] == ["en"] and meta["library_name"] == "transformers"
    assert meta["base_model"] == "supermix-v1" and "wordnet" in meta["datasets"]
    results = meta["model-index"][0]["results"]
    got = {m["type"]: m["value"] for r in results for m in r["metrics"]}
    assert got == {k: v.metrics[k] for k in ("val_bpb", "grounded_qa", "citation_accuracy", "refusal_accuracy")}
    c = v.config
    for row in (f"| layers | {c['n_layers']} |", f"| hidden size | {c['dim']} |",
                f"| attention heads | {c['n_heads']} |", f"| key/value heads | {c['n_kv_heads']} |",
                f"| FFN (SwiGLU) hidden | {c['ffn_hidden']} |", f"| vocabulary | {c['vocab_size']:,} |",
                f"| context window | {c['max_seq_len']:,} tokens |", f"{v.params:,} total",
                "| grounded QA: key fact and right citation | 0.1250 |", "| citation accuracy | 0.5000 |",
                f"| pretraining steps | {v.training['steps']:,} |", "&lt;&#124;end&#124;&gt;", "PSF-2.0", "GFDL-1.1-or-later",
                "It returns None [1].", "PyTorch (TorchBackend) fp32", "run with `--export DIR`",
                "v2 is the registry champion", "| base run it started from | 40 steps"):
        assert row in text, row
    assert placeholders(text) == []  # the model's own "None" sits inside the samples block
    png = out.parent / "loss_curve.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and "![Training loss against step](loss_curve.png)" in text


def test_card_with_an_export_manifest_shows_its_speeds_sizes_and_gates(registry, tmp_path):
    reg, _ = registry
    export = tmp_path / "export"
    export.mkdir()
    (export / "manifest.json").write_text(json.dumps({
        "format": "supermix-export-v1", "model_version": "v2", "created": "2026-11-22T10:00:00Z",
        "config": reg.get("v2").config, "tokenizer_sha256": reg.get("v2").tokenizer_sha256,
        "metrics": reg.get("v2").metrics, "generation": {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 256},
        "files": [{"path": "onnx/model.onnx", "bytes": 4_200_000, "sha256": "ab" * 32},
                  {"path": "onnx/model_quantized.onnx", "bytes": 1_300_000, "sha256": "cd" * 32}],
        "gates": [{"name": "onnx fp32 parity", "passed": True, "value": 0.0, "threshold": "<= 1e-4"}],
        "speed": {"torch_fp32_tok_s": 150.5, "onnx_int8_tok_s": 410.25}}))
    out = tmp_path / "README.md"
    result = CliRunner().invoke(main, ["card", "--root", str(reg.root), "--model", "v2", "--export", str(export),
                                       "--out", str(out), "--dataset-manifest",
                                       str(REPO / "datasets/manifests/default.json")])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    for row in ("| PyTorch (TorchBackend) fp32 | 150.5 |", "| ONNX Runtime int8 (onnx/model_quantized.onnx) | 410.2",
                "| `onnx/model.onnx` | 4.2 MB |", "| onnx fp32 parity | passed | 0.0 | &lt;= 1e-4 |"):
        assert row in text, row
    assert "ONNX Runtime fp32" not in text and "TorchBackend) int8" not in text  # only the speeds present
    assert "onnx" in front(text)["tags"] and placeholders(text) == []


def test_a_version_without_logs_or_samples_says_so_and_writes_no_png(registry, tmp_path):
    reg, _ = registry
    out = tmp_path / "README.md"
    (reg.root / "versions" / "v1" / "training_metrics.jsonl").rename(tmp_path / "kept.jsonl")
    try:
        result = CliRunner().invoke(main, ["card", "--root", str(reg.root), "--model", "v1", "--out", str(out),
                                           "--dataset-manifest", str(REPO / "datasets/manifests/default.json")])
    finally:
        (tmp_path / "kept.jsonl").rename(reg.root / "versions" / "v1" / "training_metrics.jsonl")
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "no loss curve" in text and not (tmp_path / "loss_curve.png").exists()
    v1 = reg.get("v1")  # the pretrain run logged val_bpb: that is its only metric, and it has no eval.json
    assert f"| validation bits per byte (lower is better) | {v1.metrics['val_bpb']:.4f} |" in text
    assert "| grounded QA" not in text and "has no recorded samples yet" in text and "base_model" not in front(text)
    assert "v1 is not the champion; the champion is v2" in text and placeholders(text) == []


def test_placeholders_are_caught():
    assert placeholders("| hardware | unknown |\n| x | {{ y }} |\nfine\n| z | None |")  == [
        "| hardware | unknown |", "| x | {{ y }} |", "| z | None |"]
    assert placeholders("<!-- samples -->\n> None\n<!-- /samples -->\nthe registry has none") == []


def test_a_bad_export_manifest_is_a_clear_error(registry, tmp_path):
    reg, _ = registry
    (tmp_path / "manifest.json").write_text('{"format": "other"}')
    result = CliRunner().invoke(main, ["card", "--root", str(reg.root), "--export", str(tmp_path),
                                       "--out", str(tmp_path / "c.md")])
    assert result.exit_code == 1 and "field 'format'" in result.output and "Traceback" not in result.output


def test_a_dpo_version_names_its_run_preference_tuning(registry, tiny_workspace, tmp_path):
    """A DPO version's own run is "preference tuning" in the card, and its curve is that run alone."""
    import torch

    from builder.card import phase_name, plot_loss
    from source.run_logs import PRETRAIN_LOG, TRAINING_LOG

    reg, root = registry
    run = root / "runs" / "dpo"
    run.mkdir(parents=True)
    ckpt = torch.load(root / "runs" / "sft" / "model.pth", weights_only=True)
    torch.save({**ckpt, "kind": "dpo"}, run / "model.pth")
    (run / "run.json").write_text((root / "runs" / "sft" / "run.json").read_text())
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 10, "loss": 0.69, "tokens": 800, "elapsed": 2.0, "margin": 0.0},
        {"step": 20, "loss": 0.52, "tokens": 1600, "elapsed": 4.0, "margin": 0.4}]))
    v = reg.add(run / "model.pth", tiny_workspace["tokenizer"], parent="v2")
    assert v.kind == "dpo" and phase_name(v.kind) == "preference tuning"
    out = tmp_path / "card" / "README.md"
    result = CliRunner().invoke(main, ["card", "--model", v.id, "--root", str(reg.root), "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "| preference tuning steps |" in text and "| fine-tuning steps |" not in text
    # the curve: the DPO run's own log only (its loss is not a cross-entropy on the pretraining's axis)
    folder = reg.root / "versions" / v.id
    assert (folder / PRETRAIN_LOG).is_file()  # kept for the card's "base run" row, not plotted
    assert plot_loss(folder, tmp_path / "dpo.png", "dpo")
    (folder / TRAINING_LOG).unlink()
    assert not plot_loss(folder, tmp_path / "none.png", "dpo")  # the pretraining log alone is not plotted
