"""Chat fine-tuning: assistant-only loss mask, full and LoRA SFT through the CLI, evaluation report."""

import json
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from builder.cli import main as builder_main
from source.checkpoint import load_model
from source.sft_batches import ChatBatches
from source.tokenizer import Tokenizer

WORDS = ["zorblax", "quintet", "mellow", "parsec", "lambda", "sieve", "kernel", "tuple", "vector", "socket"]


def synthetic_examples(n: int, seed: int) -> list[dict]:
    """Grounded Q&A in the real example format: the answer copies the passage and cites it."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        word, other = rng.sample(WORDS, 2)
        fact = f"{word} is a kind of {other} used in example {i}."
        passages = [{"id": f"doc:{other}#0", "title": other, "source": "user", "text": f"{other} is unrelated."},
                    {"id": f"doc:{word}#0", "title": word, "source": "user", "text": fact}]
        rng.shuffle(passages)
        gold = 1 + [p["title"] for p in passages].index(word)
        out.append({"messages": [{"role": "user", "content": f"What is {word}?"},
                                 {"role": "assistant", "content": f"{fact} [{gold}]"}],
                    "context": passages, "meta": {"kind": "grounded", "entity": word, "source": "user",
                                                  "gold": f"doc:{word}#0"}})
    return out


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sft")
    for name, n, seed in (("train.jsonl", 64, 0), ("test.jsonl", 8, 1)):
        (d / name).write_text("".join(json.dumps(e) + "\n" for e in synthetic_examples(n, seed)))
    return d


def test_loss_mask_covers_exactly_the_assistant_reply(tiny_workspace, sft_dir):
    tok = Tokenizer.load(tiny_workspace["tokenizer"])
    batches = ChatBatches(sft_dir, tok, seq_len=256, seed=0)
    x, y, mask = batches.batch("train", 4, 256, step=3)
    assert x.shape == y.shape == mask.shape and torch.equal(x[:, 1:], y[:, :-1])
    examples = [json.loads(line) for line in (sft_dir / "train.jsonl").read_text().splitlines()]
    replies = {tuple(tok.encode(e["messages"][-1]["content"]) + [tok.special_ids["end"]]) for e in examples}
    for row in range(4):
        supervised = y[row][mask[row].bool()].tolist()
        assert tuple(supervised) in replies  # the reply and its <|end|>, nothing from system/context/user
    assert batches.batch("train", 4, 256, step=3)[0].equal(x)  # addressed by step: reproducible


def test_prompt_loss_weight_weights_the_prompt_and_keeps_val_replies_only(tiny_workspace, sft_dir):
    from source.config import ModelConfig
    from source.model import Transformer

    tok = Tokenizer.load(tiny_workspace["tokenizer"])
    plain = ChatBatches(sft_dir, tok, seq_len=256, seed=0)
    weighted = ChatBatches(sft_dir, tok, seq_len=256, seed=0, prompt_loss_weight=0.05)
    x, y, mask = plain.batch("train", 4, 256, step=3)
    wx, wy, weights = weighted.batch("train", 4, 256, step=3)
    assert wx.equal(x) and wy.equal(y) and weights.is_floating_point()
    lengths = [len(ids) - 1 for ids, _ in (weighted.splits["train"][i] for i in range(len(weighted)))]
    for row in range(4):
        real = (weights[row] > 0).sum().item()
        assert real in lengths  # padding gets weight 0
        assert torch.equal(weights[row][mask[row].bool()], torch.ones(int(mask[row].sum())))
        prompt = weights[row][:real][~mask[row][:real].bool()]
        assert prompt.numel() > 0 and torch.allclose(prompt, torch.full_like(prompt, 0.05))
    assert not weighted.batch("val", 4, 256, step=0)[2].is_floating_point()  # val loss: replies only

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                    ffn_hidden=64, max_seq_len=256))
    logits, _ = model(x)
    _, replies_only = model(x, y, loss_mask=mask)
    per_token = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")
    assert torch.allclose(replies_only, per_token[mask.bool()].mean(), atol=1e-5)
    _, weighted_loss = model(x, y, loss_mask=weights)
    assert torch.allclose(weighted_loss, (per_token * weights).sum() / weights.sum(), atol=1e-5)
    assert not torch.allclose(weighted_loss, replies_only)
    _, as_float = model(x, y, loss_mask=mask.float())  # 0/1 weights == the plain mask
    assert torch.allclose(as_float, replies_only, atol=1e-5)


def test_sft_full_and_lora_via_cli(tiny_workspace, tiny_base, sft_dir, tmp_path):
    runner = CliRunner()
    common = ["--preset", "tiny", "--base", str(tiny_base), "--data", str(sft_dir), "--tokenizer",
              str(tiny_workspace["tokenizer"]), "--set", "max_steps=30", "--set", "eval_every=15", "--samples", "2"]
    full = runner.invoke(builder_main, ["sft", *common, "--out", str(tmp_path / "full")])
    assert full.exit_code == 0, full.output
    assert "Q: What is" in full.output
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]
    model, ckpt = load_model(tmp_path / "full" / "model.pth")
    assert ckpt["kind"] == "sft" and ckpt["step"] == 30

    lora = runner.invoke(builder_main, ["sft", *common, "--out", str(tmp_path / "lora"), "--lora", "--lora-rank", "4"])
    assert lora.exit_code == 0, lora.output
    merged, ckpt = load_model(tmp_path / "lora" / "model.pth")
    base, _ = load_model(tiny_base)
    assert ckpt["kind"] == "lora-merged" and type(merged).__name__ == "Transformer"
    assert torch.equal(merged.embed_tokens.weight, base.embed_tokens.weight)  # frozen
    assert not torch.equal(merged.layers[0].self_attn.q_proj.weight, base.layers[0].self_attn.q_proj.weight)
    run = json.loads((tmp_path / "lora" / "run.json").read_text())
    assert 0 < run["trainable_params"] < run["params"] / 5

    # continuing from an SFT model with the same seed would replay its batches: said, and a new seed is quiet
    again = runner.invoke(builder_main, ["sft", *common[:3], str(tmp_path / "full" / "model.pth"), *common[4:8],
                                         "--set", "max_steps=2", "--samples", "0", "--out", str(tmp_path / "again")])
    assert again.exit_code == 0 and "starts with the same chats in the same order" in again.output
    other_seed = runner.invoke(builder_main, ["sft", *common[:3], str(tmp_path / "full" / "model.pth"), *common[4:8],
                                              "--set", "max_steps=2", "--set", "seed=7", "--samples", "0",
                                              "--out", str(tmp_path / "again2")])
    assert other_seed.exit_code == 0 and "same order" not in other_seed.output

    # resuming the full run on top of another base would fine-tune the old weights: refused
    other = [*common[:3], str(tmp_path / "lora" / "model.pth"), *common[4:]]
    stale = runner.invoke(builder_main, ["sft", *other, "--out", str(tmp_path / "full"), "--resume"])
    assert stale.exit_code != 0 and "start a fresh run" in stale.output

    # resuming a full fine-tune as LoRA, a damaged run.json and a nonsensical LoRA scale: one clear line each
    as_lora = runner.invoke(builder_main, ["sft", *common, "--out", str(tmp_path / "full"), "--resume", "--lora"])
    assert as_lora.exit_code == 1 and "no LoRA adapters" in as_lora.output and "Traceback" not in as_lora.output
    (tmp_path / "full" / "run.json").write_text('{"parent_sha256": ')
    damaged = runner.invoke(builder_main, ["sft", *common, "--out", str(tmp_path / "full"), "--resume"])
    assert damaged.exit_code == 1 and "run.json: not readable JSON" in damaged.output, damaged.output
    for alpha in ("nan", "-1", "inf"):
        bad = runner.invoke(builder_main, ["sft", *common, "--lora", "--lora-alpha", alpha])
        assert bad.exit_code == 2 and "not a finite number > 0" in bad.output, bad.output


def test_sft_rejects_mismatched_inputs(tiny_workspace, tiny_base, sft_dir, tmp_path):
    runner = CliRunner()
    r = runner.invoke(builder_main, ["sft", "--base", str(tiny_base), "--data", str(tmp_path), "--tokenizer",
                                     str(tiny_workspace["tokenizer"])])
    assert r.exit_code != 0 and "run `builder sft-data` first" in r.output
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"messages": []}\n{oops\n')
    (bad / "test.jsonl").write_text("")
    r = runner.invoke(builder_main, ["sft", "--base", str(tiny_base), "--data", str(bad), "--tokenizer",
                                     str(tiny_workspace["tokenizer"])])
    assert r.exit_code != 0 and "train.jsonl:2" in r.output


def test_eval_report_and_registry_metrics(tiny_workspace, tiny_base, sft_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    root = tmp_path / "models"
    added = runner.invoke(builder_main, ["models", "--root", str(root), "add", str(tiny_base), "--tokenizer",
                                         str(tiny_workspace["tokenizer"])])
    assert added.exit_code == 0, added.output
    r = runner.invoke(builder_main, ["eval", "--model", "v1", "--root", str(root), "--data", str(tiny_workspace["data"]),
                                     "--sft-data", str(sft_dir), "--index", str(tmp_path / "none.sqlite"),
                                     "--out", str(tmp_path / "eval.json")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "eval.json").read_text())
    assert 0 < report["val_bpb"] < 10 and report["n_grounded"] == 8
    assert 0 <= report["grounded_qa"] <= report["fact_recall_pass"] <= 1
    assert len(report["samples"]) == 5 and all(isinstance(s["answer"], str) for s in report["samples"])
    info = json.loads((root / "registry.json").read_text())
    assert info["versions"][0]["metrics"]["val_bpb"] == pytest.approx(report["val_bpb"])
    # a run's .pth with no tokenizer beside it and no runs/tokenizer: --tokenizer is enough
    r = runner.invoke(builder_main, ["eval", "--model", str(tiny_base), "--tokenizer", str(tiny_workspace["tokenizer"]),
                                     "--root", str(root), "--data", str(tiny_workspace["data"]), "--sft-data",
                                     str(sft_dir), "--index", str(tmp_path / "none.sqlite"), "--limit", "4",
                                     "--out", str(tmp_path / "eval-path.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "eval-path.json").read_text())["val_bpb"] == pytest.approx(report["val_bpb"])
