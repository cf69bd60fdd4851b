"""`builder release --retrain`: a recipe file replayed piece by piece in a scratch checkout, resumably, the result
registered with its lineage and shown on the card; a bad recipe is one clear error."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from builder import release as release_mod
from builder.cli import main
from builder.recipe import PAUSED_EXIT, RecipeError, load_recipe
from source.files import sha256_file
from source.lineage import lineage_rows
from source.registry import Registry, RegistryError

REPO = Path(__file__).resolve().parent.parent
RUNS = Path("dist/quick/runs")


def _recipe(**changes) -> dict:
    recipe = {
        "format": "supermix-recipe-v1", "name": "test",
        "data": {"recipe": "datasets/recipes/default.json", "manifest_sha256": None},
        "tokenizer": {"vocab_size": 1000, "max_chars": 30000000, "seed": 0, "sha256": None},
        "index": {"max_chars": 600},
        "sft_data": {"seed": 0, "limit": None, "max_tokens": 256, "stats_sha256": None},
        "pieces": [
            {"name": "base-tiny", "stage": "pretrain", "preset": "tiny", "data": "corpus", "steps": 10,
             "set": {"checkpoint_every": 5, "eval_every": 10, "seed": 3, "precision": "fp32"}, "options": {"no-samples": True}},
            {"name": "sft-a", "stage": "sft", "base": "base-tiny", "preset": "tiny", "data": "sft-data", "steps": 4,
             "set": {"lr": 0.001, "eval_every": 4, "precision": "fp32"}, "options": {"samples": 0}},
            {"name": "sft-b", "stage": "sft", "base": "sft-a", "preset": "tiny", "data": "sft-data", "steps": 3,
             "set": {"lr": 0.0005, "seed": 7, "eval_every": 3, "precision": "fp32"}, "options": {"samples": 0}}]}
    recipe.update(changes)
    return recipe


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


@pytest.mark.slow
def test_retrain_replays_a_recipe_piece_by_piece_resumes_skips_and_records_lineage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty checkout: datasets/, dist/ all land here
    corpus = tmp_path / "datasets" / "recipes" / "default.json"
    corpus.parent.mkdir(parents=True)
    corpus.write_text(json.dumps({"name": "default", "sources": [
        {"name": "pydoc-topics", "weight": 1.0, "license": "PSF-2.0"}]}))
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(_recipe()))
    monkeypatch.setitem(release_mod.PROFILES, "quick", dataclasses.replace(release_mod.PROFILES["quick"], eval_limit=4))
    retrain = ("release", "--retrain", "--profile", "quick", "--recipe", str(recipe), "--only-training")

    # no time left: the data, tokenizer, index and chat data are built, then it stops before the first piece
    code, out = _invoke(*retrain, "--max-minutes", "0")
    assert code == PAUSED_EXIT and "--max-minutes reached before piece 'base-tiny'" in out, out
    assert (RUNS / "tokenizer" / "tokenizer.model").is_file() and not (RUNS / "base-tiny").exists()

    # a piece cut short (a run stopped at its first checkpoint, as by Ctrl-C): the replay resumes it
    code, out = _invoke("pretrain", "--preset", "tiny", "--data", "datasets/built/default", "--tokenizer",
                        str(RUNS / "tokenizer"), "--out", str(RUNS / "base-tiny"), "--no-samples", "--set", "max_steps=5",
                        "--set", "checkpoint_every=5", "--set", "eval_every=10", "--set", "seed=3",
                        "--set", "precision=fp32")
    assert code == 0, out
    code, out = _invoke(*retrain)
    assert code == 0, out
    assert "base-tiny    pretrain its checkpoint is at step 5 of 10: resuming with --resume" in out, out
    assert "sft-a        sft     no checkpoint yet: starting from base-tiny" in out
    assert "sft-b        sft     no checkpoint yet: starting from sft-a" in out
    assert "training only; dist/pages left as it was" in out

    reg = Registry("dist/quick/models")
    v = reg.get("champion")
    assert v.id == "v1" and v.training["recipe"]["name"] == "test"
    assert [(p["name"], p["stage"], p["parent"], p["steps"], p["seed"], p["lr"]) for p in v.lineage] == [
        ("base-tiny", "pretrain", None, 10, 3, 0.003), ("sft-a", "sft", "base-tiny", 4, 1337, 0.001),
        ("sft-b", "sft", "sft-a", 3, 7, 0.0005)]
    sft_data_sha = sha256_file("dist/quick/sft/train.jsonl")
    assert [p["data_sha256"] for p in v.lineage[1:]] == [sft_data_sha] * 2
    assert v.lineage[0]["data_sha256"] and all(p["wall_seconds"] > 0 and p["source"] == "run" for p in v.lineage)
    assert "grounded_qa" in v.metrics  # evaluated
    code, out = _invoke("models", "--root", "dist/quick/models", "info", "v1", "--json")
    info = json.loads(out)
    assert code == 0 and info["lineage"] == v.lineage and info["ancestors"] == ["v1"]

    # again: every piece is finished, the model already registered
    mtimes = {p: (RUNS / p / "model.pth").stat().st_mtime_ns for p in ("base-tiny", "sft-a", "sft-b")}
    code, out = _invoke(*retrain)
    assert code == 0, out
    for piece, steps in (("base-tiny", 10), ("sft-a", 4), ("sft-b", 3)):
        assert f"{piece:<12} skip    step {steps} of {steps} reached" in out, out
    assert "already registered as v1" in out and [x.id for x in reg.versions()] == ["v1"]
    assert mtimes == {p: (RUNS / p / "model.pth").stat().st_mtime_ns for p in mtimes}

    # the card shows the lineage table
    code, out = _invoke("card", "--model", "v1", "--root", "dist/quick/models", "--out", "card/README.md")
    assert code == 0, out
    card = (tmp_path / "card" / "README.md").read_text()
    assert "### Lineage" in card and "| base-tiny | pretrain | scratch |" in card
    assert f"| sft-b | sft | sft-a | {sft_data_sha[:12]} | 3 | 7 | 0.0005 |" in card

    # a recipe that no longer matches a finished run: an error naming the run and the setting, nothing retrained
    changed = _recipe()
    changed["pieces"][2]["set"]["lr"] = 0.0002
    recipe.write_text(json.dumps(changed))
    code, out = _invoke(*retrain)
    assert code == 1 and "dist/quick/runs/sft-b was trained with other inputs" in out and "lr=0.0005" in out, out

    # a piece appended to the recipe: only it trains, even with the run folders before its base gone (as when
    # a committed version's model.pth is copied into its piece's folder instead of replaying its chain)
    appended = _recipe()
    appended["pieces"].append({"name": "sft-c", "stage": "sft", "base": "sft-b", "preset": "tiny", "data": "sft-data",
                               "steps": 2, "set": {"lr": 0.0003, "seed": 9, "eval_every": 2, "precision": "fp32"},
                               "options": {"samples": 0}})
    recipe.write_text(json.dumps(appended))
    shutil.rmtree(RUNS / "base-tiny")
    shutil.rmtree(RUNS / "sft-a")
    code, out = _invoke(*retrain)
    assert code == 0, out
    assert "base-tiny    skip    not needed: sft-b, built on it, is finished" in out, out
    assert "sft-a        skip    not needed: sft-b, built on it, is finished" in out
    assert "sft-b        skip    step 3 of 3 reached" in out and "sft-c        sft     no checkpoint yet" in out
    v2 = reg.get("latest")
    assert [(p["name"], p["parent"], p["steps"], p["source"]) for p in v2.lineage] == [
        ("base-tiny", None, 10, "recipe"), ("sft-a", "base-tiny", 4, "recipe"), ("sft-b", "sft-a", 3, "run"),
        ("sft-c", "sft-b", 2, "run")]


@pytest.mark.parametrize("change, message", [
    (lambda r: r["pieces"][1].update(steps="many"), "pieces[1] (sft-a).steps: wrong type str"),
    (lambda r: r["pieces"][2].update(base="sft-z"), "pieces[2] (sft-b).base: 'sft-z' is not an earlier piece"),
    (lambda r: r["pieces"][0].update(lr=0.1), "pieces[0] (base-tiny): unknown field 'lr'"),
    (lambda r: r["pieces"][0].update(stage="distill"), "pieces[0] (base-tiny).stage: 'distill' is not one of"),
    (lambda r: r["tokenizer"].pop("vocab_size"), "tokenizer: missing field 'vocab_size'"),
])
def test_a_bad_recipe_is_one_error_naming_the_file_and_the_field(tmp_path, change, message):
    recipe = _recipe()
    change(recipe)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(recipe))
    with pytest.raises(RecipeError, match="bad.json: " + message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_recipe(path)
    result = CliRunner().invoke(main, ["release", "--retrain", "--recipe", str(path)])
    assert result.exit_code == 1 and f"{path}: " in result.output and "Traceback" not in result.output, result.output


def test_the_committed_recipes_load_and_the_champion_recipe_rebuilds_each_version_it_names():
    champion = load_recipe(REPO / "models" / "recipes" / "champion.json")
    registry = Registry(REPO / "models")
    last = champion.pieces[-1]
    named = [p for p in champion.pieces if p.recorded.get("version") in {v.id for v in registry.versions()}]
    assert last in named
    for piece in named:  # every committed version the recipe names: its steps, seed and lr as it was trained
        v = registry.get(piece.recorded["version"])
        tc = v.training["train_config"]
        assert piece.steps == v.training["steps"] and piece.set["seed"] == tc["seed"] and piece.set["lr"] == tc["lr"]
        assert champion.tokenizer["sha256"] == v.tokenizer_sha256
    assert [p.name for p in champion.chain(last.name)] == [p.name for p in champion.pieces]  # one line of descent
    assert champion.notes and load_recipe(REPO / "models" / "recipes" / "quick.json").pieces


def test_versions_without_lineage_stay_valid_and_the_card_says_what_is_not_recorded(tmp_path):
    # the committed registry as it was before lineage existed: the champion's entry without the field
    data = json.loads((REPO / "models" / "registry.json").read_text())
    entry = next(v for v in data["versions"] if v["id"] == data["champion"])
    del entry["lineage"]
    (tmp_path / "registry.json").write_text(json.dumps(data))
    old = Registry(tmp_path).get(entry["id"])
    assert old.lineage == []
    shown = lineage_rows(old.lineage, old.training, old.kind, old.parent, old.id)
    tc = old.training["train_config"]
    assert shown["rows"] == [[old.id, old.kind, old.parent, "not recorded", f"{old.training['steps']:,}",
                              str(tc["seed"]), f"{tc['lr']:g}", shown["rows"][0][-1]]]
    assert "not recorded" in shown["note"]
    # a malformed lineage is a registry error naming the field
    entry["lineage"] = [{"steps": 3}, "x"]
    (tmp_path / "registry.json").write_text(json.dumps(data))
    with pytest.raises(RegistryError, match=rf"\({entry['id']}\): field 'lineage' \[1\] must be an object"):
        Registry(tmp_path).load()


def test_a_piece_is_a_command_line_whatever_its_stage(tmp_path):
    """A preference piece needs no runner code: the same mapping gives `builder dpo --base PREV/model.pth ...`."""
    from builder.recipe import piece_args
    from builder.release import PROFILES, Release

    raw = _recipe()
    raw["pieces"].append({"name": "dpo-a", "stage": "dpo", "base": "sft-b", "preset": "tiny", "data": "sft-data",
                          "steps": 5, "set": {"lr": 1e-5, "seed": 11}, "options": {"mine": 200, "tokenizer": None}})
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(raw))
    piece = load_recipe(path).pieces[-1]
    r = Release(PROFILES["quick"], lambda args: None, log=lambda _: None)
    assert piece_args(piece, r, resume=True) == [
        "dpo", "--out", "dist/quick/runs/dpo-a", "--base", "dist/quick/runs/sft-b/model.pth", "--preset", "tiny",
        "--data", "dist/quick/sft", "--mine", "200", "--set", "max_steps=5", "--set", "lr=1e-05", "--set", "seed=11",
        "--resume"]


def test_a_tokenizer_with_the_recorded_sha256_is_kept_not_retrained(tmp_path, monkeypatch):
    """`cp -r models/versions/v9/tokenizer runs/tokenizer` is enough: the replay keeps the tokenizer its recipe records."""
    from builder.recipe import retrain_stages
    from builder.release import PROFILES, Release

    monkeypatch.chdir(tmp_path)
    tok = Path("dist/quick/runs/tokenizer")
    tok.mkdir(parents=True)
    (tok / "tokenizer.model").write_bytes(b"the tokenizer")
    calls, logs = [], []
    r = Release(PROFILES["quick"], calls.append, log=logs.append)

    def tokenizer_stage(sha):
        path = tmp_path / "recipe.json"
        path.write_text(json.dumps(_recipe(tokenizer={"vocab_size": 1000, "max_chars": 100, "seed": 0, "sha256": sha})))
        return next(s for s in retrain_stages(load_recipe(path), None, True) if s.name == "tokenizer")

    tokenizer_stage(sha256_file(tok / "tokenizer.model")).run(r)
    assert calls == [] and "is the tokenizer the recipe records" in logs[-1]
    tokenizer_stage("0" * 64).run(r)  # another tokenizer is there: trained as the recipe says
    assert calls == [["tokenizer", "train", "--data", "datasets/built/default", "--out", str(tok), "--vocab-size", "1000",
                      "--max-chars", "100", "--seed", "0"]]
