"""`builder sft --base NAME`: fine-tune an imported Hugging Face base on our own stack, register the result, and
`supermix ask` it. Tiny random Llama (untied, head_dim != hidden/heads) and Qwen2 folders in shards, a byte-level
BPE tokenizer with a ChatML template (tests/hf_folders.py), a few LoRA steps on a tiny SFT set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hf_folders import byte_level_tokenizer, model_folder
from test_sft import synthetic_examples

from builder.cli import main as builder
from runtime_python.cli import main as supermix
from source.base_model import load_base
from source.checkpoint import load_model
from source.hf_tokenizer import HFTokenizer
from source.prompt import build_prompt
from source.sft_data import DEFAULT_SYSTEM_PROMPT

QUESTION = "What is zorblax?"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("sftbase")
    tok = byte_level_tokenizer(root / "tok")
    bases = {"llama": model_folder(root / "llama", tok, tied=False, head_dim=32, seed=3, perturb=True),
             "qwen": model_folder(root / "qwen", tok, model_type="qwen2", seed=4, perturb=True)}
    data = root / "sft"
    data.mkdir()
    for name, n, seed in (("train.jsonl", 24, 0), ("test.jsonl", 4, 1)):
        (data / name).write_text("".join(json.dumps(e) + "\n" for e in synthetic_examples(n, seed)))
    for name, folder in bases.items():
        result = CliRunner().invoke(builder, ["base", "--root", str(root / "models"), "import", str(folder),
                                              "--name", name])
        assert result.exit_code == 0, result.output
    return root, bases, data


def run_sft(root, data, name, *extra):
    args = ["sft", "--base", name, "--models-root", str(root / "models"), "--data", str(data), "--out",
            str(root / f"run-{name}"), "--preset", "tiny", "--set", "max_steps=4", "--set", "batch_size=2",
            "--set", "seq_len=192", "--set", "precision=fp32", "--set", "lr=3e-3", "--samples", "1", *extra]
    result = CliRunner().invoke(builder, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_the_loss_mask_covers_each_reply_and_its_end_token(workspace):
    _, bases, _ = workspace
    tok = HFTokenizer.load(bases["llama"])
    example = synthetic_examples(1, 0)[0]
    messages = [{"role": "context", "content": "[1] a passage"}, *example["messages"]]
    ids, mask = tok.encode_chat(messages, add_generation_prompt=False)
    text = tok.tk.decode  # with the special tokens spelled out
    assert text([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == \
        example["messages"][-1]["content"] + "<|im_end|>"
    start = mask.index(1)  # the prompt, template and all, is not trained on; the reply is one run
    assert text(ids[:start], skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert mask == [0] * start + [1] * sum(mask) + [0] * (len(mask) - start - sum(mask))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "qwen"])
def test_sft_lora_registers_a_self_contained_version_that_supermix_answers(name, workspace, monkeypatch):
    root, bases, data = workspace
    output = run_sft(root, data, name, "--lora", "--lora-rank", "4")
    registry = json.loads((root / "models" / "registry.json").read_text())
    version = registry["versions"][-1]
    vid, folder = version["id"], root / "models" / "versions" / registry["versions"][-1]["id"]
    assert f"registered {vid} (base {name}, licence mit)" in output and "Q: What is" in output
    # self-contained: the .pth and the base's tokenizer, template and licence, every file hashed
    paths = {f["path"] for f in version["files"]}
    for rel in ("model.pth", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
                "tokenizer/chat_template.jinja", "tokenizer/LICENSE"):
        assert f"versions/{vid}/{rel}" in paths
    base_entry = registry["bases"][name]
    lineage = version["lineage"]
    assert lineage[0]["stage"] == "base" and lineage[0]["name"] == name and lineage[0]["licence"] == "mit"
    assert lineage[0]["files"] == [{"path": f["path"], "sha256": f["sha256"]} for f in base_entry["files"]]
    assert lineage[1]["stage"] == "lora-merged" and lineage[1]["parent"] == name
    assert version["tokenizer_sha256"] == base_entry["tokenizer"]["sha256"] and version["kind"] == "lora-merged"
    # LoRA merged into plain weights, which moved away from the base's
    model, ckpt = load_model(folder / "model.pth")
    base, tok, _ = load_base(bases[name])
    assert not any("lora" in k for k in ckpt["model"])
    assert model.cfg == base.cfg
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert any("q_proj.weight" in k for k in moved) and "embed_tokens.weight" not in moved
    # supermix ask on the version, by its registry id: its default engine and torch's, equal to our greedy generate
    tok = HFTokenizer.load(folder / "tokenizer")
    prompt = build_prompt(tok, [{"role": "user", "content": QUESTION}], [], DEFAULT_SYSTEM_PROMPT, 24,
                          model.cfg.max_seq_len).ids
    stops = tuple({tok.eos_id, tok.bos_id, *tok.special_ids.values()} - {None})
    expected = tok.decode(model.generate(prompt, 24, stop_ids=stops))
    assert len(expected) >= 3, "the model stopped at once: pick another seed for a real check"
    monkeypatch.chdir(root)
    for backend in ("auto", "torch"):
        result = CliRunner().invoke(supermix, ["ask", QUESTION, "--model", vid, "--no-retrieval", "-t", "0",
                                               "--max-tokens", "24", "--json", "--backend", backend])
        assert result.exit_code == 0, result.output
        answer = json.loads(result.stdout)
        assert answer["answer"] == expected and answer["model"] == vid


@pytest.mark.slow
def test_bf16_lora_with_checkpointing_saves_fp32_weights(workspace):
    root, _, data = workspace
    output = run_sft(root, data, "llama", "--lora", "--bf16", "--grad-checkpointing")
    run = json.loads((root / "run-llama" / "run.json").read_text())
    assert run["base_bf16"] is True and run["model"]["gradient_checkpointing"] is True
    _, ckpt = load_model(root / "run-llama" / "model.pth")
    assert {v.dtype for v in ckpt["model"].values()} == {torch.float32} and "registered v" in output


def test_sft_refuses_a_changed_base_and_bf16_without_lora(workspace, tmp_path):
    import shutil

    root, bases, data = workspace
    copy = shutil.copytree(bases["qwen"], tmp_path / "copy")
    models = tmp_path / "models"
    assert CliRunner().invoke(builder, ["base", "--root", str(models), "import", str(copy)]).exit_code == 0
    common = ["sft", "--base", "copy", "--models-root", str(models), "--data", str(data), "--out", str(tmp_path / "r")]
    result = CliRunner().invoke(builder, [*common, "--bf16"])
    assert result.exit_code != 0 and "--bf16 holds the frozen base in bf16 for --lora" in result.output
    (copy / "LICENSE").write_text("changed")
    result = CliRunner().invoke(builder, [*common, "--lora"])
    assert result.exit_code != 0 and "LICENSE: " in result.output and "the folder changed since" in result.output
    assert "versions" not in json.loads((models / "registry.json").read_text()) or \
        not json.loads((models / "registry.json").read_text())["versions"]


@pytest.mark.slow
def test_eval_and_card_of_a_version_from_a_base(workspace, tiny_workspace, monkeypatch):
    """bits/byte over the bytes of the text (comparable across tokenizers); the card names the base and licence."""
    from source.corpus.build import iter_texts

    root, _, data = workspace
    models = root / "models"
    if not json.loads((models / "registry.json").read_text()).get("versions"):
        run_sft(root, data, "qwen", "--lora")
    vid = json.loads((models / "registry.json").read_text())["versions"][-1]["id"]
    monkeypatch.chdir(root)
    result = CliRunner().invoke(builder, ["eval", "--model", vid, "--root", str(models), "--data",
                                          str(tiny_workspace["data"]), "--sft-data", str(data), "--index",
                                          str(root / "none"), "--out", str(root / "eval.json"), "--limit", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads((root / "eval.json").read_text())
    meta = json.loads(next((root / "runs" / "tokens").glob("*/meta.json")).read_text())
    assert meta["val"]["bytes"] == sum(len(t.encode("utf-8")) for t in iter_texts(tiny_workspace["data"], "val"))
    assert report["val_bpb"] == pytest.approx(report["val_loss"] / 0.6931471805599453 * meta["val"]["tokens"] /
                                              meta["val"]["bytes"])
    assert json.loads((models / "registry.json").read_text())["versions"][-1]["metrics"]["val_bpb"] == \
        pytest.approx(report["val_bpb"])
    manifest = Path(__file__).resolve().parents[1] / "datasets" / "manifests" / "default.json"
    card = CliRunner().invoke(builder, ["card", "--model", vid, "--root", str(models), "--out", str(root / "card.md"),
                                        "--dataset-manifest", str(manifest)])
    assert card.exit_code == 0, card.output
    text = (root / "card.md").read_text()
    base = json.loads((models / "registry.json").read_text())["versions"][-1]["lineage"][0]["name"]  # the last sft's
    assert "license: mit\n" in text and f"base_model: {base}\n" in text
    assert f"Fine-tuned from the imported base model `{base}` (" in text and "licence is **mit**" in text
    assert f"| {base} | base | imported |" in text and "the base model's own chat template" in text


@pytest.mark.slow
def test_a_lora_run_from_a_base_resumes(workspace, tmp_path):
    root, _, data = workspace
    common = ["sft", "--base", "llama", "--models-root", str(root / "models"), "--data", str(data), "--out",
              str(tmp_path / "run"), "--set", "batch_size=2", "--set", "seq_len=192", "--set", "precision=fp32",
              "--set", "checkpoint_every=2", "--samples", "0", "--lora", "--lora-rank", "4"]
    first = CliRunner().invoke(builder, [*common, "--set", "max_steps=2"])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(builder, [*common, "--set", "max_steps=4", "--resume"])
    assert again.exit_code == 0, again.output
    _, ckpt = load_model(tmp_path / "run" / "model.pth")
    assert ckpt["step"] == 4 and ckpt["kind"] == "lora-merged"
