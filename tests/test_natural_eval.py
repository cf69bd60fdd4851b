"""Natural questions: scoring on crafted replies, JSONL validation, and `builder eval --questions` end to end
through torch, onnx and (slow) the site in headless Chromium on the tiny model.

The tiny model answers garbage, so the end-to-end tests check structure (counts, metrics in [0, 1],
every item's reply and sources recorded, agreement computed, no request leaving 127.0.0.1), not quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from builder.cli import main as builder_main
from source.natural_eval import (ItemError, aggregate, agreement, fact_present, load_items, quote_check, score_item,
                                 sentences)

REPO = Path(__file__).resolve().parent.parent

PASSAGE = ("The for statement is used to iterate over the elements of a sequence (such as a string, tuple or "
           "list) or other iterable object.")
ITEM = {"id": "language-001", "kind": "language", "question": "how does a for loop work", "history": [],
        "gold": ["pydoc:topic:for"], "facts": ["iterate", "sequence | iterable"]}
SHOWN = [{"id": "pydoc:topic:for#0", "text": PASSAGE}, {"id": "wordnet:n:123#0", "text": "A loop is a circle."}]


def _line(**over) -> str:
    return json.dumps({**ITEM, **over})


# ----------------------------------------------------------------------------- scoring

def test_correct_needs_every_fact_and_a_gold_citation():
    good = "The for statement is used to iterate over the elements of a sequence [1]."
    s = score_item(ITEM, good, ["pydoc:topic:for#0"], SHOWN)
    assert s["correct"] and s["facts_ok"] and s["cites_gold"] and s["retrieved"] and not s["refused"]
    # a missing fact (neither alternative), a wrong citation, no citation: each fails `correct`
    s = score_item(ITEM, "It is used to iterate [1].", ["pydoc:topic:for#0"], SHOWN)
    assert not s["correct"] and s["missing_facts"] == ["sequence | iterable"] and s["cites_gold"]
    s = score_item(ITEM, "You ITERATE over an Iterable [2].", ["wordnet:n:123#0"], SHOWN)
    assert s["facts_ok"] and not s["cites_gold"] and not s["correct"]  # case-insensitive, alternatives
    s = score_item(ITEM, good.replace(" [1]", ""), [], SHOWN)
    assert s["facts_ok"] and not s["correct"]
    # a gold citation that was not among the shown passages does not count
    assert not score_item(ITEM, good, ["pydoc:topic:for#3"], SHOWN)["cites_gold"]
    # retrieval: no gold record shown
    s = score_item(ITEM, "I don't know.", [], SHOWN[1:])
    assert not s["retrieved"] and s["refused"] and not s["correct"]


def test_no_answer_and_chitchat():
    no = {**ITEM, "id": "no-answer-001", "kind": "no-answer", "gold": [], "facts": []}
    assert score_item(no, "I don't know; the sources do not cover that.", [], SHOWN)["refused"]
    assert not score_item(no, "It is 42 [1].", [], SHOWN)["refused"]
    assert "correct" not in score_item(no, "x", [], SHOWN)
    chat = {**no, "id": "chitchat-001", "kind": "chitchat"}
    assert score_item(chat, "Hello! Nice to meet you.", [], [])["answered"]
    assert not score_item(chat, "  ", [], [])["answered"]
    assert not score_item(chat, "I'm not sure.", [], [])["answered"]


def test_copy_fidelity_sentences():
    assert sentences("It iterates [1]. Then it stops [1, 2]!\nDone") == ["It iterates.", "Then it stops!", "Done"]
    # verbatim (whitespace-normalized, trailing period optional)
    assert quote_check("The for statement is used to  iterate over the elements of a sequence.", [PASSAGE]) == (True, True)
    # a paraphrase that leans on the passage quotes, but is not verbatim; case counts
    assert quote_check("The for statement is used to iterate over the items of a sequence.", [PASSAGE]) == (True, False)
    assert quote_check("the for statement is used to iterate over the elements of A sequence", [PASSAGE]) == (True, False)
    # a framing opening is allowed, the copy itself must run exactly to the end
    assert quote_check("for: The for statement is used to iterate over the elements of a sequence.", [PASSAGE]) == \
        (True, True)
    assert quote_check("for: The for statement is used to iterate over the elements of a sequense.", [PASSAGE]) == \
        (True, False)
    # too short, or not from the passage: not a quote
    assert quote_check("Iterate over sequence.", [PASSAGE]) == (False, False)
    assert quote_check("Dogs like to play fetch in the park.", [PASSAGE]) == (False, False)
    s = score_item(ITEM, "The for statement is used to iterate over the elements of a sequence [1]. "
                         "The for statement is used to loop over things in a sequence.", [], SHOWN)
    assert s["quotes"] and not s["verbatim"] and (s["quote_sentences"], s["verbatim_sentences"]) == (2, 1)


def test_aggregate_and_agreement():
    no = {**ITEM, "id": "no-answer-001", "kind": "no-answer", "gold": [], "facts": []}
    chat = {**no, "id": "chitchat-001", "kind": "chitchat"}
    good = "The for statement is used to iterate over the elements of a sequence [1]."
    scored = [(ITEM, score_item(ITEM, good, ["pydoc:topic:for#0"], SHOWN)),
              ({**ITEM, "id": "language-002"}, score_item(ITEM, "I do not know.", [], SHOWN)),
              (no, score_item(no, "It is 42.", [], SHOWN)), (chat, score_item(chat, "Hi there!", [], []))]
    m = aggregate(scored)
    o = m["overall"]
    assert (o["n"], o["n_answerable"], o["n_no_answer"], o["n_chitchat"], o["n_quoting"]) == (4, 2, 1, 1, 1)
    assert (o["correct"], o["refused_answerable"], o["retrieval_hit"]) == (0.5, 0.5, 1.0)
    assert (o["refusal_on_no_answer"], o["answered_no_answer"], o["chitchat_answered"], o["copy_fidelity"]) == (0, 1, 1, 1)
    assert list(m["by_kind"]) == ["language", "chitchat", "no-answer"]
    assert m["by_kind"]["chitchat"]["correct"] is None and m["by_kind"]["language"]["n"] == 2
    a = agreement({"onnx": {"a": "x", "b": "y"}, "site": {"a": "x", "b": "z"}, "torch": {"a": "q"}})
    assert a["onnx-site"] == {"n": 2, "same": 1, "share": 0.5, "differ": ["b"]}
    assert a["onnx-torch"]["n"] == 1 and a["onnx-torch"]["differ"] == ["a"]


def test_fact_alternatives_and_whitespace():
    assert fact_present("zero | zeroes", "pads with ZEROES on the left")
    assert fact_present("on the  left", "on the\nleft side")
    assert not fact_present("right", "on the left")


# ----------------------------------------------------------------------------- JSONL validation

@pytest.mark.parametrize("line, message", [
    ("{oops", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (_line(kind="api"), "id 'language-001' must be 'api-NNN'"),
    (_line(kind="poetry"), "kind 'poetry' is not one of"),
    (json.dumps({k: v for k, v in ITEM.items() if k != "facts"}), "missing field 'facts'"),
    (_line(question="  "), "question must be a non-empty string"),
    (_line(history=[{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]), "history[0]"),
    (_line(history=[{"role": "user", "content": "hi"}]), "must end with the assistant's turn"),
    (_line(gold=[]), "gold must name at least one record"),
    (_line(gold=["pydoc:topic:for#0"]), "drop the '#n'"),
    (_line(facts=["ok", 3]), "facts must be a list of non-empty strings"),
    (_line(id="no-answer-001", kind="no-answer"), "must be [] for kind 'no-answer'"),
    (_line(), "repeats line 1"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "q.jsonl"
    path.write_text(_line() + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ItemError) as e:
        load_items(path)
    assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value)
    r = CliRunner().invoke(builder_main, ["eval", "--questions", str(path), "--via", "onnx"])
    assert r.exit_code == 1 and "q.jsonl:3: " in r.output and "Traceback" not in r.output


def test_valid_file_and_cli_errors(tmp_path):
    path = tmp_path / "q.jsonl"
    follow = {**ITEM, "id": "language-002", "history": [{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": "hello"}], "note": "extra ok"}
    path.write_text(_line() + "\n" + json.dumps(follow) + "\n", encoding="utf-8")
    assert [i["id"] for i in load_items(path)] == ["language-001", "language-002"]
    runner = CliRunner()
    for args, message in [(["--via", "onnx", "--export", str(tmp_path / "none")], "is not an export folder"),
                          (["--via", "site", "--site", str(tmp_path / "none")], "is not a built site"),
                          (["--via", "gpu"], "--via takes"),
                          (["--via", "onnx", "--limit", "1", "--sample", "1"], "not both")]:
        r = runner.invoke(builder_main, ["eval", "--questions", str(path), *args])
        assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output
    r = runner.invoke(builder_main, ["eval", "--questions", str(tmp_path / "missing.jsonl"), "--via", "onnx"])
    assert r.exit_code == 1 and "not found" in r.output


# ----------------------------------------------------------------------------- end to end on the tiny model

def _fixture_items(path: Path) -> Path:
    """Six items over the tiny corpus (pydoc topics + WordNet): answerable, a follow-up, no-answer, chitchat."""
    items = [
        {"id": "language-001", "kind": "language", "question": "how does the for statement work", "history": [],
         "gold": ["pydoc:topic:for"], "facts": ["iterate | iterable"]},
        {"id": "language-002", "kind": "language", "question": "and what about while", "gold": ["pydoc:topic:while"],
         "history": [{"role": "user", "content": "what is a for loop"},
                     {"role": "assistant", "content": "It iterates over a sequence [1]."}], "facts": ["loop"]},
        {"id": "language-003", "kind": "language", "question": "what is a lambda expression", "history": [],
         "gold": ["pydoc:topic:lambda"], "facts": ["lambda"]},
        {"id": "no-answer-001", "kind": "no-answer", "question": "who won the football world cup in 2022",
         "history": [], "gold": [], "facts": []},
        {"id": "chitchat-001", "kind": "chitchat", "question": "hi how are you", "history": [], "gold": [], "facts": []},
        {"id": "chitchat-002", "kind": "chitchat", "question": "thanks thats helpful", "gold": [], "facts": [],
         "history": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi! How can I help?"}]},
    ]
    path.write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
    return path


def _check_path(run: dict, n: int) -> None:
    assert len(run["items"]) == n and run["seconds"] > 0
    for key, value in run["metrics"]["overall"].items():
        if not key.startswith("n") and value is not None:
            assert 0 <= value <= 1, (key, value)
    assert run["metrics"]["overall"]["n"] == n and run["metrics"]["overall"]["n_answerable"] + \
        run["metrics"]["overall"]["n_no_answer"] + run["metrics"]["overall"]["n_chitchat"] == n
    for it in run["items"]:
        assert isinstance(it["reply"], str) and set(it["citations"]) <= set(it["shown"])
        assert it["shown"] or it["kind"] in ("chitchat", "no-answer")  # questions about the corpus find passages
        assert it["finish_reason"] in ("stop", "length") and 0 <= it["completion_tokens"] <= 16


def test_eval_torch_and_onnx(tiny_base, tiny_workspace, tiny_index, tiny_export, tmp_path):
    questions = _fixture_items(tmp_path / "natural.jsonl")
    out = tmp_path / "report.json"
    r = CliRunner().invoke(builder_main, [
        "eval", "--questions", str(questions), "--via", "torch,onnx", "--model", str(tiny_base),
        "--tokenizer", str(tiny_workspace["tokenizer"]), "--index", str(tiny_index), "--export", str(tiny_export),
        "--max-new-tokens", "16", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())["natural"]
    assert report["n_items"] == 6 and report["max_new_tokens"] == 16 and set(report["paths"]) == {"torch", "onnx"}
    for run in report["paths"].values():
        _check_path(run, 6)
    assert len(report["paths"]["torch"]["model_sha256"]) == 64 and len(report["paths"]["onnx"]["onnx_sha256"]) == 64
    assert report["paths"]["torch"]["retrieval"] == str(tiny_index)
    assert report["paths"]["onnx"]["retrieval"] == str(tiny_export / "index")
    a = report["agreement"]["torch-onnx"]
    assert a["n"] == 6 and a["same"] + len(a["differ"]) == 6
    assert "| **overall** |" in r.output and "| metric | torch | onnx |" in r.output and "agreement torch-onnx" in r.output
    # the default 256 new tokens cannot fit the tiny model's 256-token window: a clear error
    r = CliRunner().invoke(builder_main, ["eval", "--questions", str(questions), "--via", "onnx", "--export",
                                          str(tiny_export), "--limit", "1", "--out", str(out), "--quiet"])
    assert r.exit_code == 1 and "language-001: cannot fit a prompt" in r.output, r.output
    # a seeded sample: the same items for the same seed, file order kept
    runner = CliRunner()
    picked = []
    for _ in range(2):
        r = runner.invoke(builder_main, ["eval", "--questions", str(questions), "--via", "onnx", "--export",
                                         str(tiny_export), "--sample", "3", "--seed", "7", "--max-new-tokens", "8", "--out", str(out),
                                         "--quiet"])
        assert r.exit_code == 0, r.output
        run = json.loads(out.read_text())["natural"]["paths"]["onnx"]
        picked.append([it["id"] for it in run["items"]])
        assert run["retrieval"].endswith("index") and "agreement" not in json.loads(out.read_text())["natural"]
    assert picked[0] == picked[1] and len(picked[0]) == 3
    ids = [json.loads(line)["id"] for line in questions.read_text().splitlines()]
    assert picked[0] == [i for i in ids if i in picked[0]]
    # --dtype picks the file OnnxBackend (and the site) load: the report names it and its hash
    r = runner.invoke(builder_main, ["eval", "--questions", str(questions), "--via", "onnx", "--export", str(tiny_export),
                                     "--limit", "1", "--max-new-tokens", "8", "--dtype", "fp32", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())["natural"]
    run = report["paths"]["onnx"]
    assert report["onnx_dtype"] == "fp32" and run["onnx_file"] == "onnx/model.onnx" and "fp32" in run["backend"]


needs_site = pytest.mark.skipif(
    not (REPO / "web_static/node_modules/@huggingface/transformers").is_dir() or not Path("/usr/bin/chromium").exists(),
    reason="needs `npm ci --ignore-scripts` in web_static and Debian's chromium")


@pytest.mark.slow
@needs_site
def test_eval_site_in_chromium(tiny_export, tmp_path):
    from builder.site import build_site

    site = tmp_path / "site"
    build_site(tiny_export, site)
    questions = _fixture_items(tmp_path / "natural.jsonl")
    out = tmp_path / "report.json"
    r = CliRunner().invoke(builder_main, ["eval", "--questions", str(questions), "--via", "onnx,site", "--export",
                                          str(tiny_export), "--site", str(site), "--limit", "3",
                                          "--max-new-tokens", "16", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())["natural"]
    assert report["n_items"] == 3
    site_run = report["paths"]["site"]
    _check_path(site_run, 3)
    assert site_run["external_requests"] == 0 and "requests leaving 127.0.0.1: 0" in r.output
    assert site_run["onnx_sha256"] == report["paths"]["onnx"]["onnx_sha256"]  # the same int8 file
    a = report["agreement"]["onnx-site"]
    assert a["n"] == 3 and a["same"] + len(a["differ"]) == 3
    # same file, same browser index, same prompt (the follow-up's history through startConversation):
    # test_site.py checks the browser's greedy tokens equal onnxruntime's, so the replies agree here too
    assert a["share"] == 1.0, a
    onnx_items = report["paths"]["onnx"]["items"]
    assert [it["shown"] for it in site_run["items"]] == [it["shown"] for it in onnx_items]
    assert [it["prompt_tokens"] for it in site_run["items"]] == [it["prompt_tokens"] for it in onnx_items]
    assert site_run["items"][1]["prompt_tokens"] > 0 and report["paths"]["onnx"]["items"][1]["id"] == "language-002"
    # a prompt that cannot fit (the tiny window is 256 tokens): a clear error, as on the Python paths
    r = CliRunner().invoke(builder_main, ["eval", "--questions", str(questions), "--via", "site", "--site", str(site),
                                          "--limit", "1", "--out", str(out), "--quiet"])
    assert r.exit_code == 1 and "language-001: the site's worker failed: cannot fit a prompt" in r.output, r.output


def test_eval_held_out_and_natural_together(tiny_base, tiny_workspace, tiny_index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # token shards go under ./runs
    questions = _fixture_items(tmp_path / "natural.jsonl")
    sft = tmp_path / "sft"
    sft.mkdir()
    passage = {"id": "pydoc:topic:for#0", "title": "for", "source": "pydoc-topics", "text": PASSAGE}
    (sft / "test.jsonl").write_text(json.dumps({
        "messages": [{"role": "user", "content": "What is the for statement?"},
                     {"role": "assistant", "content": PASSAGE + " [1]"}],
        "context": [passage], "meta": {"kind": "grounded", "gold": passage["id"]}}) + "\n", encoding="utf-8")
    out = tmp_path / "eval.json"
    r = CliRunner().invoke(builder_main, [
        "eval", "--questions", str(questions), "--held-out", "--model", str(tiny_base), "--tokenizer",
        str(tiny_workspace["tokenizer"]), "--data", str(tiny_workspace["data"]), "--sft-data", str(sft), "--index",
        str(tiny_index), "--limit", "2", "--max-new-tokens", "8", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert 0 < report["val_bpb"] < 10 and report["n_grounded"] == 1 and report["natural"]["n_items"] == 2
    assert "| metric | torch | held-out (templates) |" in r.output
    row = next(line for line in r.output.splitlines() if line.startswith("| correct |"))
    assert row.endswith(f"| {report['grounded_qa']:.3f} |")


def test_whole_set_figures_of_a_registry_version_are_recorded(tiny_base, tiny_workspace, tiny_index, tmp_path):
    from source.registry import Registry

    questions = _fixture_items(tmp_path / "natural.jsonl")
    root = tmp_path / "models"
    registry = Registry(root)
    registry.add(tiny_base, tiny_workspace["tokenizer"])
    common = ["eval", "--questions", str(questions), "--via", "torch", "--model", "v1", "--root", str(root),
              "--index", str(tiny_index), "--max-new-tokens", "8", "--quiet"]
    r = CliRunner().invoke(builder_main, [*common, "--sample", "3", "--out", str(tmp_path / "sample.json")])
    assert r.exit_code == 0, r.output
    assert not any(k.startswith("natural_") for k in registry.get("v1").metrics)  # a sample ranks nothing
    r = CliRunner().invoke(builder_main, [*common, "--out", str(tmp_path / "all.json")])
    assert r.exit_code == 0, r.output
    overall = json.loads((tmp_path / "all.json").read_text())["natural"]["paths"]["torch"]["metrics"]["overall"]
    metrics = registry.get("v1").metrics
    assert metrics["natural_torch_correct"] == overall["correct"]
    assert metrics["natural_torch_refusal_on_no_answer"] == overall["refusal_on_no_answer"]
    assert "natural figures recorded for v1" in r.output
