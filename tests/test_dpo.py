"""Preference tuning: `builder dpo` on user pairs and mined pairs, the pair format's errors, exact resume."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from builder.cli import main as builder_main
from source.checkpoint import load_model, read_checkpoint
from source.dpo import PairBatches, check_pair, load_pairs, mined_pair, pair_stats, reference_logps
from source.tokenizer import Tokenizer
from test_sft import synthetic_examples

REFUSAL = "I don't know — the sources I have don't cover that."


@pytest.fixture(scope="module")
def sft_model(tiny_workspace, tiny_base, tmp_path_factory) -> Path:
    """The tiny base fine-tuned for a few steps on grounded synthetic chats: the model DPO starts from."""
    root = tmp_path_factory.mktemp("dpo-sft")
    data = root / "data"
    data.mkdir()
    for name, n, seed in (("train.jsonl", 32, 0), ("test.jsonl", 4, 1)):
        (data / name).write_text("".join(json.dumps(e) + "\n" for e in synthetic_examples(n, seed)))
    r = CliRunner().invoke(builder_main, ["sft", "--preset", "tiny", "--base", str(tiny_base), "--data", str(data),
                                          "--tokenizer", str(tiny_workspace["tokenizer"]), "--out", str(root / "run"),
                                          "--set", "max_steps=10", "--samples", "0"])
    assert r.exit_code == 0, r.output
    return root / "run" / "model.pth"


def preference_pairs(n: int = 8) -> list[dict]:
    """Grounded questions: chosen = the cited copy of the passage, rejected = a refusal or a garbled copy."""
    pairs = []
    for i, ex in enumerate(synthetic_examples(n, seed=5)):
        gold = ex["messages"][-1]["content"]
        rejected = REFUSAL if i % 2 else gold.replace(" is a kind of ", " was large of ")
        pairs.append({"prompt": ex["messages"][0]["content"], "context": ex["context"], "chosen": gold,
                      "rejected": rejected})
    return pairs


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def dpo(tiny_workspace, base: Path, out: Path, *args: str):
    return CliRunner().invoke(builder_main, ["dpo", "--base", str(base), "--tokenizer", str(tiny_workspace["tokenizer"]),
                                             "--out", str(out), "--quiet", *args])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_preference_file_moves_the_policy_towards_chosen(tiny_workspace, sft_model, tmp_path):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_pairs())
    out = tmp_path / "dpo"
    r = dpo(tiny_workspace, sft_model, out, "--pairs", str(prefs), "--set", "max_steps=12", "--set", "log_every=1",
            "--set", "beta=0.1", "--set", "chosen_nll=0")  # pure DPO: its loss at the reference is ln 2
    assert r.exit_code == 0, r.output
    assert "reward margin" in r.output and "accuracy" in r.output
    logged = [m for m in metrics(out) if "margin" in m]
    assert len(logged) == 12 and {"loss", "margin", "accuracy", "chosen_reward", "rejected_reward"} <= set(logged[0])
    # step 1 sees the policy before any update: it is the reference, so the margin is 0 and the loss ln 2
    assert abs(logged[0]["margin"]) < 1e-3 and abs(logged[0]["loss"] - 0.6931) < 1e-3, logged[0]
    assert logged[-1]["loss"] < logged[0]["loss"] - 0.02 and logged[-1]["accuracy"] >= 0.75, logged[-1]

    # measured independently of the training log, on the same pairs against the frozen SFT weights
    tok = Tokenizer.load(tiny_workspace["tokenizer"])
    pairs, _ = load_pairs(prefs)
    data = PairBatches(pairs, tok, 256)
    reference, _ = load_model(sft_model)
    reference_logps(reference, data)
    before = pair_stats(reference, data, "val", beta=0.1)
    tuned, ckpt = load_model(out / "model.pth")
    after = pair_stats(tuned, data, "val", beta=0.1)
    assert abs(before["margin"]) < 1e-4 and before["accuracy"] == 0.0
    assert after["margin"] > before["margin"] + 0.02 and after["accuracy"] >= 0.75 and after["loss"] < before["loss"]
    moved = max((a - b).abs().max().item() for a, b in zip(tuned.state_dict().values(), reference.state_dict().values()))
    assert moved > 1e-4

    # a normal checkpoint: kind "dpo", its parent recorded, and the registry takes it
    assert ckpt["kind"] == "dpo" and ckpt["parent_checkpoint"] == str(sft_model) and ckpt["dpo"]["beta"] == 0.1
    assert ckpt["dpo"]["chosen_nll"] == 0.0
    r = CliRunner().invoke(builder_main, ["models", "--root", str(tmp_path / "models"), "add", str(out / "model.pth"),
                                          "--tokenizer", str(tiny_workspace["tokenizer"])])
    assert r.exit_code == 0 and "(dpo," in r.output, r.output


def test_a_bad_preference_line_names_file_line_and_field(tiny_workspace, sft_model, tmp_path):
    good = preference_pairs(1)[0]
    cases = [
        ({k: v for k, v in good.items() if k != "rejected"}, "rejected: missing"),
        ({**good, "chosen": 3}, "chosen: must be a non-empty string"),
        ({**good, "rejected": good["chosen"]}, "rejected: the same text as chosen"),
        ({k: v for k, v in good.items() if k != "prompt"}, "prompt: give either"),
        ({**{k: v for k, v in good.items() if k != "prompt"}, "messages": [{"role": "user", "content": "q"},
                                                                         {"role": "assistant", "content": "a"}]},
         "messages[1].role: the last message must be the user's"),
        ({**good, "context": [{"title": "no text"}]}, "context[0].text: missing"),
        ('{"prompt": "q", "chosen": "a",', "invalid JSON"),
    ]
    for bad, message in cases:
        path = write_jsonl(tmp_path / "prefs.jsonl", [good, bad])
        with pytest.raises(ValueError) as err:
            load_pairs(path)
        assert str(err.value).startswith(f"{path}:2: {message}"), (str(err.value), message)
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(good).encode() + b"\n" + '{"prompt": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match=r"latin1.jsonl:2: not valid UTF-8 \(byte \d+"):
        load_pairs(tmp_path / "latin1.jsonl")
    assert check_pair({"messages": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"})["meta"]["kind"] == "user"

    # through the CLI: one clear error, no traceback; --skip-bad skips and counts
    path = write_jsonl(tmp_path / "prefs.jsonl", [good, cases[0][0], good])
    r = dpo(tiny_workspace, sft_model, tmp_path / "out", "--pairs", str(path))
    assert r.exit_code != 0 and f"{path}:2: rejected: missing" in r.output and "Traceback" not in r.output
    r = dpo(tiny_workspace, sft_model, tmp_path / "out", "--pairs", str(path), "--skip-bad", "--set", "max_steps=1")
    assert r.exit_code == 0, r.output
    assert read_checkpoint(tmp_path / "out" / "model.pth")["pairs"][str(path)] == {"pairs": 2, "skipped_bad": 1}
    r = dpo(tiny_workspace, sft_model, tmp_path / "out2")
    assert r.exit_code != 0 and "--pairs FILE and/or --mine N" in r.output


def test_chosen_nll_adds_the_chosen_replies_per_token_nll():
    import torch

    from source.dpo import dpo_loss

    policy, ref = torch.tensor([-4.0, -9.0, -6.0, -5.0]), torch.tensor([-5.0, -8.0, -6.0, -6.0])  # 2 chosen, 2 rejected
    tokens = torch.tensor([2.0, 3.0])
    plain, stats = dpo_loss(policy, ref, 0.1)
    assert "chosen_nll" not in stats
    both, stats = dpo_loss(policy, ref, 0.1, chosen_nll=0.5, chosen_tokens=tokens)
    nll = (4.0 / 2 + 9.0 / 3) / 2  # the chosen rows' mean NLL per supervised token
    assert torch.isclose(stats["chosen_nll"], torch.tensor(nll)) and torch.isclose(both, plain + 0.5 * nll)


def test_mined_pair_rule():
    refusal = lambda text: "don't know" in text  # noqa: E731
    grounded = {"messages": [{"role": "user", "content": "What is x?"}, {"role": "assistant", "content": "x: a y. [1]"}],
                "context": [{"id": "d", "text": "x: a y."}], "meta": {"kind": "grounded"}}
    no_answer = {"messages": [{"role": "user", "content": "What is z?"}, {"role": "assistant", "content": REFUSAL}],
                 "meta": {"kind": "no-answer"}}
    assert mined_pair(grounded, "x: a y.  [1]", refusal) == ("same", None)
    reason, pair = mined_pair(grounded, "I don't know.", refusal)
    assert reason == "refused" and pair["chosen"] == "x: a y. [1]" and pair["rejected"] == "I don't know."
    assert pair["context"] == grounded["context"] and pair["messages"] == grounded["messages"][:1]
    assert mined_pair(grounded, "x: a large. [2]", refusal)[0] == "differs"
    reason, pair = mined_pair(no_answer, "z is a letter [1].", refusal)
    assert reason == "answered" and pair["chosen"] == REFUSAL and pair["rejected"] == "z is a letter [1]."
    assert mined_pair(no_answer, "Sorry, I don't know.", refusal) == ("refused-ok", None)
    assert mined_pair({**grounded, "meta": {"kind": "chitchat"}}, "hi", refusal) == ("other-kind", None)
    assert check_pair(pair)["rejected"] == pair["rejected"]  # a mined pair is a valid preference line


def test_mining_pairs_from_the_models_greedy_answers(tiny_workspace, sft_model, tmp_path):
    from builder.dpo_mine import greedy_answer
    from runtime_python.backends import TorchBackend

    examples = synthetic_examples(3, seed=7)
    backend = TorchBackend.load(sft_model, tiny_workspace["tokenizer"])
    # the first example's gold reply is the model's own answer: no pair; the others' gold replies are not
    same = {**examples[0], "messages": [examples[0]["messages"][0],
                                        {"role": "assistant", "content": greedy_answer(backend, examples[0], 96)}]}
    assert same["messages"][-1]["content"]  # the tiny model says something
    no_answer = {"messages": [examples[2]["messages"][0], {"role": "assistant", "content": REFUSAL}],
                 "context": examples[2]["context"], "meta": {"kind": "no-answer", "entity": "", "source": "user"}}
    chitchat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}],
                "meta": {"kind": "chitchat"}}
    data = tmp_path / "sft"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [same, examples[1], no_answer, chitchat])
    out = tmp_path / "dpo"
    r = dpo(tiny_workspace, sft_model, out, "--mine", "4", "--data", str(data), "--set", "max_steps=2")
    assert r.exit_code == 0, r.output
    stats = json.loads((out / "pairs-stats.json").read_text())
    assert stats["examples"] == 4 and stats["reasons"] == {"same": 1, "differs": 1, "answered": 1, "other-kind": 1}, stats
    pairs, _ = load_pairs(out / "pairs.jsonl")
    by_reason = {p["meta"]["reason"]: p for p in pairs}
    assert set(by_reason) == {"differs", "answered"}
    assert by_reason["differs"]["chosen"] == examples[1]["messages"][-1]["content"]
    assert by_reason["answered"]["chosen"] == REFUSAL
    assert by_reason["answered"]["rejected"] == greedy_answer(backend, no_answer, 96)
    assert "mined 2 pairs from 4 examples" in r.output


def test_resume_after_a_crash_continues_exactly(tiny_workspace, sft_model, tmp_path, monkeypatch):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_pairs())
    args = ["--pairs", str(prefs), "--set", "max_steps=4", "--set", "checkpoint_every=2", "--set", "log_every=1"]
    straight = tmp_path / "straight"
    assert dpo(tiny_workspace, sft_model, straight, *args).exit_code == 0

    crashed = tmp_path / "crashed"
    real_batch = PairBatches.batch

    def crash_at_step_3(self, split, *a, **kw):
        if split == "train" and a[2] == 3:  # (batch_size, seq_len, step, ...): after the step-2 checkpoint
            raise RuntimeError("killed")
        return real_batch(self, split, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(PairBatches, "batch", crash_at_step_3)
        assert dpo(tiny_workspace, sft_model, crashed, *args).exit_code != 0
    assert torch.load(crashed / "train_state.pt", weights_only=True)["step"] == 2
    r = dpo(tiny_workspace, sft_model, crashed, *args, "--resume")
    assert r.exit_code == 0, r.output
    def trace(out: Path) -> list[tuple]:  # everything but timings
        return [(m["step"], m.get("loss"), m.get("margin"), m.get("accuracy"), m.get("val_loss")) for m in metrics(out)]

    assert trace(crashed) == trace(straight) and len(trace(straight)) == 4 + 1  # 4 steps + 1 val loss
    a, _ = load_model(straight / "model.pth")
    b, _ = load_model(crashed / "model.pth")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
