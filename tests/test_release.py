"""`builder release` end to end on a tiny profile in a scratch checkout: every stage runs, then is cached."""

import json
import time

import click
import pytest

from builder import export_gates
from builder.cli import main
from builder.release import PROFILES, Profile, Release, select


TRAINING = {"tokenizer", "pretrain", "sft-data", "sft", "dpo", "registry"}


def _release(profile, calls, start=None, only=None):
    def cli(args):
        calls.append(args[0])
        main.main(args=args, prog_name="builder", standalone_mode=False)

    r = Release(profile, cli, log=lambda _: None)
    r.execute(*select(start, only))
    return r, r.publish(time.perf_counter())


@pytest.mark.slow
def test_release_runs_every_stage_then_caches_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a scratch checkout: datasets/, runs/, models/, dist/ all land here
    recipe = tmp_path / "datasets" / "recipes" / "default.json"
    recipe.parent.mkdir(parents=True)
    recipe.write_text(json.dumps({"name": "default", "sources": [
        {"name": "pydoc-topics", "weight": 1.0, "license": "PSF-2.0"}]}))
    profile = Profile("test", "tiny", 1000, 20, 20, 1e-3, "models", "runs", "datasets/built/sft", None, 10,
                      natural_sample=3, dpo_mine=12, dpo_steps=3)
    questions = tmp_path / "datasets" / "eval" / "natural.jsonl"
    questions.parent.mkdir(parents=True)
    questions.write_text("".join(json.dumps(item) + "\n" for item in [
        {"id": "language-001", "kind": "language", "question": "how does a for loop work", "history": [],
         "gold": ["pydoc:topic:for"], "facts": ["iterate"]},
        {"id": "language-002", "kind": "language", "question": "and while?", "gold": ["pydoc:topic:while"],
         "facts": ["repeated"], "history": [{"role": "user", "content": "for loops"},
                                            {"role": "assistant", "content": "They iterate [1]."}]},
        {"id": "no-answer-001", "kind": "no-answer", "question": "who won the 2022 world cup", "history": [],
         "gold": [], "facts": []},
        {"id": "chitchat-001", "kind": "chitchat", "question": "hi there", "history": [], "gold": [], "facts": []}]))

    calls: list[str] = []
    r, summary = _release(profile, calls)
    assert [s["status"] for s in summary["stages"]] == ["ran"] * 14, summary["stages"]
    assert (tmp_path / "datasets" / "manifests" / "default.json").is_file()  # the first build is the reference
    pages = tmp_path / "dist" / "pages"
    for name in ("index.html", ".nojekyll", "docs/index.html"):
        assert (pages / name).is_file(), name
    manifest = json.loads((tmp_path / "dist" / "release-manifest.json").read_text())
    assert manifest["champion"] == "v1" and all(g["passed"] for g in manifest["gates"] if g["required"])
    lock = json.loads((tmp_path / "models" / "release.lock.json").read_text())
    assert lock["champion"] == "v1"
    # the champion is the preference-tuned SFT model, tuned on pairs mined from its answers
    assert json.loads((tmp_path / "models" / "registry.json").read_text())["versions"][0]["kind"] == "dpo"
    assert json.loads((tmp_path / "runs" / "dpo-tiny" / "pairs-stats.json").read_text())["examples"] == 12
    # the champion's natural questions went through torch, onnx and the site, stored beside it and in the card
    natural = json.loads((tmp_path / "models" / "versions" / "v1" / "eval-natural.json").read_text())
    assert set(natural["natural"]["paths"]) == {"torch", "onnx", "site"} and natural["natural"]["n_items"] == 3, natural["natural"]["selection"]
    assert natural["natural"]["paths"]["site"]["external_requests"] == 0
    assert manifest["natural"]["cached"] is False and set(manifest["natural"]["overall"]) == {"torch", "onnx", "site"}
    assert "Natural questions, through the paths people use" in (tmp_path / "dist" / "card" / "README.md").read_text()

    calls.clear()  # nothing changed: training comes from the lock, data/index/export/card from the state file
    r, summary = _release(profile, calls)
    status = {s["stage"]: s for s in summary["stages"]}
    assert [status[n] for n in sorted(TRAINING | {"data", "index", "export", "card"})
            if status[n]["status"] != "cached"] == []
    assert "lock" in status["sft"]["note"]
    assert calls == ["site", "eval", "site", "docs"]  # the natural stage re-checks a sample through the site
    manifest = json.loads((tmp_path / "dist" / "release-manifest.json").read_text())
    check = manifest["natural"]["site_check"]
    assert manifest["natural"]["cached"] and check["items"] == 4 and 0 <= check["same_reply"] <= 1

    calls.clear()  # --from export re-runs export and everything after it, nothing before
    _release(profile, calls, start="export")
    assert calls == ["export", "site", "eval", "card", "site", "docs"]  # the same int8 file: a site check

    before = {p.relative_to(pages): p.stat().st_mtime_ns for p in pages.rglob("*")}
    monkeypatch.setattr(export_gates, "INT8_SIZE_RATIO", 0.01)  # an impossible bar: the gate must fail
    with pytest.raises(click.ClickException, match="size vs fp32"):
        _release(profile, calls, only="export")
    assert {p.relative_to(pages): p.stat().st_mtime_ns for p in pages.rglob("*")} == before  # nothing published

    recipe.write_text(recipe.read_text().replace('"weight": 1.0', '"weight": 2.0'))
    assert r.training_cached() is None  # a changed recipe invalidates the committed champion's lock


def test_release_stops_when_the_built_corpus_is_not_the_committed_one(tiny_workspace, tmp_path, monkeypatch):
    """Another machine's Python manual (a different version, other record counts) must not ship silently."""
    monkeypatch.chdir(tmp_path)
    built = tmp_path / "datasets" / "built" / "default"
    built.mkdir(parents=True)
    manifest = json.loads((tiny_workspace["data"] / "manifest.json").read_text())
    (built / "manifest.json").write_text(json.dumps(manifest))
    committed = tmp_path / "datasets" / "manifests" / "default.json"
    committed.parent.mkdir(parents=True)
    other = json.loads(json.dumps(manifest))
    other["created"] = "2020-01-01T00:00:00+00:00"  # when and where it was built do not matter
    for s in other["sources"]:
        s["path"] = "/elsewhere/" + s["name"]
    committed.write_text(json.dumps(other))

    def check(accept: bool = False) -> None:
        r = Release(PROFILES["default"], lambda args: None, log=lambda _: None, accept_corpus_change=accept)
        r.execute(*select(None, "corpus"))

    check()  # the same corpus: passes
    from click.testing import CliRunner

    result = CliRunner().invoke(main, ["release", "--only", "corpus"])  # one stage: nothing is published
    assert result.exit_code == 0 and "dist/pages left as it was" in result.output, result.output

    other["sources"][0]["version"] = "3.12.1"
    other["sources"][0]["records"]["after_pii"] += 7
    committed.write_text(json.dumps(other))
    with pytest.raises(click.ClickException) as err:
        check()
    message = err.value.format_message()
    name = manifest["sources"][0]["name"]
    assert f"{name}.version: 3.12.1 -> {manifest['sources'][0]['version']}" in message
    assert f"{name}.records.after_pii" in message and "--accept-corpus-change" in message
    assert json.loads(committed.read_text()) == other  # nothing rewritten without consent

    check(accept=True)
    assert json.loads(committed.read_text()) == manifest  # accepted: the committed file now describes this build


def test_the_committed_lock_covers_the_default_profile():
    """A clean clone's `builder release` takes the champion from models/release.lock.json only while the lock's
    key is the default profile's: editing a training field of the profile without re-keying the lock would
    make every clean clone retrain for hours. The profile has no preference stage, so the registry takes SFT."""
    r = Release(PROFILES["default"], cli=lambda args: None, log=lambda _: None)
    assert r.lock()["inputs_sha256"] == r.training_inputs()
    assert r.training_cached() == r.lock()["champion"]
    assert r.final == r.sft and PROFILES["quick"].dpo_steps > 0
