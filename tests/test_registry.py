"""The model registry on real files: tiny real checkpoints, a real trained tokenizer, no mocks."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from builder.cli import main
from source.checkpoint import save_model
from source.config import model_config
from source.model import Transformer
from source.registry import CHAMPION_RULE, Registry, RegistryError
from source.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok_dir(tiny_workspace) -> Path:
    return tiny_workspace["tokenizer"]


@pytest.fixture(scope="module")
def ckpts(tok_dir, tmp_path_factory) -> list[Path]:
    """Three tiny checkpoints (1, 2 and 3 layers) trained with the workspace tokenizer."""
    root = tmp_path_factory.mktemp("ckpts")
    sha = Tokenizer.load(tok_dir).sha256
    paths = []
    for i in range(3):
        torch.manual_seed(i)
        model = Transformer(model_config("tiny", ["vocab_size=1000", f"n_layers={i + 1}"]))
        path = root / f"run{i}" / "model.pth"
        save_model(path, model, tokenizer_sha256=sha, step=10 * (i + 1), tokens=1000 * (i + 1),
                   params=model.num_params())
        paths.append(path)
    return paths


FORMAT_LINE = '"format": "supermix-registry-v1"'


def fail_registry_writes(monkeypatch, error: OSError) -> None:
    """Make the rename that puts a new registry.json in place fail (disk full, power cut); others work."""
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "registry.json":
            raise error
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root, by relative path: 'nothing changed on disk' is equality of two snapshots."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_add_numbers_versions_and_never_reuses_a_removed_number(tmp_path, ckpts, tok_dir):
    reg = Registry(tmp_path / "models")
    assert reg.versions() == [] and not reg.path.exists()
    v1 = reg.add(ckpts[0], tok_dir, notes="base")
    v2 = reg.add(ckpts[1], tok_dir)
    assert (v1.id, v2.id) == ("v1", "v2")
    folder = tmp_path / "models" / "versions" / "v1"
    assert (folder / "model.pth").read_bytes() == ckpts[0].read_bytes()
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (folder / "tokenizer" / name).read_bytes() == (tok_dir / name).read_bytes()
    info = json.loads((folder / "model_info.json").read_text())
    assert info["id"] == "v1" and info["notes"] == "base" and info["kind"] == "pretrain"
    assert "# Supermix v1" in (folder / "README.md").read_text()
    assert all(not Path(f["path"]).is_absolute() and f["path"].startswith("versions/v1/") for f in v1.files)
    assert v1.tokenizer_sha256 == Tokenizer.load(tok_dir).sha256
    assert v1.config["n_layers"] == 1 and v1.params > 0 and v1.training["steps"] == 10

    reg.remove("v2")
    assert not (tmp_path / "models" / "versions" / "v2").exists()
    assert reg.add(ckpts[2], tok_dir).id == "v3"  # v2 stays retired
    assert [v.id for v in reg.versions()] == ["v1", "v3"]
    assert reg.get("3").id == reg.get("latest").id == reg.get("V3").id == "v3"
    with pytest.raises(RegistryError, match="no version 'v2'"):
        reg.get("v2")
    with pytest.raises(RegistryError, match="no champion"):
        reg.get("champion")

    # the registry survives a move of the whole folder: paths are relative
    shutil.move(tmp_path / "models", tmp_path / "moved")
    moved = Registry(tmp_path / "moved")
    assert set(moved.verify("v3").values()) == {"ok"}


def test_lineage_follows_parents_and_outlives_a_removed_parent(tmp_path, ckpts, tok_dir):
    reg = Registry(tmp_path / "models")
    reg.add(ckpts[0], tok_dir)
    reg.add(ckpts[1], tok_dir, parent="v1")
    reg.add(ckpts[2], tok_dir, parent="2")
    assert reg.get("v3").parent == "v2"
    assert reg.lineage("v3") == ["v3", "v2", "v1"]
    with pytest.raises(RegistryError, match="no version 'v7'"):
        reg.add(ckpts[0], tok_dir, parent="v7")
    reg.remove("v2")
    assert reg.lineage("v3") == ["v3", "v2 (removed)"]
    assert Registry(tmp_path / "models").get("v3").parent == "v2"  # still loads: lineage is history


def test_champion_rule_natural_site_first_then_grounded_qa_then_bpb_and_explicit_promote(tmp_path, ckpts, tok_dir):
    reg = Registry(tmp_path / "models")
    for ck in (*ckpts, ckpts[0]):
        reg.add(ck, tok_dir)
    assert reg.pick_champion() == (None, "no version has natural_site_correct, grounded_qa, val_bpb; nothing to "
                                         "pick (v1, v2, v3, v4: none of natural_site_correct, grounded_qa, val_bpb, "
                                         "not considered)")

    reg.set_metrics("v1", {"val_bpb": 1.5})
    reg.set_metrics("v2", {"val_bpb": 2.0})
    vid, reason = reg.pick_champion()
    assert vid == "v1" and reason.startswith("no version has natural_site_correct; no version has grounded_qa; "
                                             "v1 has the lowest val_bpb 1.5 (next: v2 with 2)")
    assert "v3, v4: none of natural_site_correct, grounded_qa, val_bpb, not considered" in reason

    reg.set_metrics("v2", {"grounded_qa": 0.5})  # merged: v2 keeps its val_bpb
    reg.set_metrics("v3", {"grounded_qa": 0.5, "val_bpb": 1.8})
    assert reg.get("v2").metrics == {"val_bpb": 2.0, "grounded_qa": 0.5}
    vid, reason = reg.pick_champion()  # grounded_qa beats v1's better bpb; the tie goes to v3's lower bpb
    assert vid == "v3" and "grounded_qa tie at 0.5; v3 has the lowest val_bpb 1.8" in reason

    reg.set_metrics("v2", {"grounded_qa": 0.61})
    vid, reason = reg.pick_champion()
    assert vid == "v2" and "v2 has the highest grounded_qa 0.61 (next: v3 with 0.5)" in reason

    reg.set_metrics("v4", {"grounded_qa": 0.61, "val_bpb": 2.0})  # a full tie keeps the older version
    vid, reason = reg.pick_champion()
    assert vid == "v2" and "the older version v2 is kept" in reason

    # what visitors get ranks first: the hand-written questions through the site beat the template score
    reg.set_metrics("v3", {"natural_site_correct": 0.15})
    vid, reason = reg.pick_champion()
    assert vid == "v3" and reason.startswith("v3 has the highest natural_site_correct 0.15 (next: v2 with ")
    reg.set_metrics("v1", {"natural_site_correct": 0.15, "grounded_qa": 0.7})
    vid, reason = reg.pick_champion()
    assert vid == "v1" and reason.startswith("natural_site_correct tie at 0.15; v1 has the highest grounded_qa 0.7")
    assert reg.champion() is None  # picking applies nothing

    assert reg.promote("v1").id == "v1"  # explicit beats the rule until the rule is applied
    assert reg.champion().id == "v1" and reg.get("champion").id == "v1"
    data = json.loads(reg.path.read_text())
    assert data["champion"] == "v1" and data["champion_rule"] == CHAMPION_RULE
    assert data["champion_reason"] == "promoted by hand"
    assert all(m in CHAMPION_RULE for m in ("natural_site_correct", "grounded_qa", "val_bpb"))
    # set_metrics keeps the version's own model_info.json in step with the registry
    info = json.loads((tmp_path / "models" / "versions" / "v1" / "model_info.json").read_text())
    assert info["metrics"] == {"val_bpb": 1.5, "natural_site_correct": 0.15, "grounded_qa": 0.7}


def test_diff_reports_config_metric_training_and_file_changes(tmp_path, ckpts, tok_dir):
    reg = Registry(tmp_path / "models")
    reg.add(ckpts[0], tok_dir, metrics={"val_bpb": 2.0})
    reg.add(ckpts[2], tok_dir, parent="v1", metrics={"val_bpb": 1.75, "grounded_qa": 0.3}, notes="deeper")
    d = reg.diff("v1", "v2")
    assert d["config"] == {"n_layers": (1, 3)}
    assert d["metrics"] == {"grounded_qa": (None, 0.3, None), "val_bpb": (2.0, 1.75, -0.25)}
    assert d["training"]["steps"] == (10, 30) and d["training"]["tokens"] == (1000, 3000)
    assert d["fields"]["parent"] == (None, "v1") and d["fields"]["notes"] == ("", "deeper")
    assert d["files"] == {"model.pth": "changed"}  # same tokenizer: its files are not listed
    assert reg.diff("v1", "v1")["config"] == {}


@pytest.mark.parametrize("mangle, message", [
    (lambda text: text.replace('"versions"', '"versions" oops', 1), r"not valid JSON \(line \d+, column \d+"),
    (lambda text: text.replace('"champion": null', '"champion": "v9"'), "field 'champion' is 'v9'"),
    (lambda text: text.replace(FORMAT_LINE, '"format": "other-v0"'), "field 'format' is 'other-v0'"),
    (lambda text: text.replace('"id": "v2"', '"id": "v1"'), r"duplicate version id\(s\) v1"),
    (lambda text: text.replace('"parent": "v1"', '"parent": "v5"'), "version v2: parent 'v5' is not an earlier"),
    (lambda text: text.replace('"tokenizer_sha256"', '"tokenizer_hash"', 1),
     r"versions\[0\] \(v1\): missing field\(s\) tokenizer_sha256"),
])
def test_corrupt_registry_gives_a_clear_error_and_changes_nothing(tmp_path, ckpts, tok_dir, mangle, message):
    reg = Registry(tmp_path / "models")
    reg.add(ckpts[0], tok_dir)
    reg.add(ckpts[1], tok_dir, parent="v1")
    reg.path.write_text(mangle(reg.path.read_text()))
    before = snapshot(tmp_path / "models")
    for action in (reg.load, lambda: reg.add(ckpts[2], tok_dir), lambda: reg.promote("v1"),
                   lambda: reg.remove("v1", force=True), lambda: reg.set_metrics("v1", {"val_bpb": 1.0})):
        with pytest.raises(RegistryError, match=message) as err:
            action()
        assert str(reg.path) in str(err.value)
    assert snapshot(tmp_path / "models") == before
    result = CliRunner().invoke(main, ["models", "--root", str(tmp_path / "models"), "list"])
    assert result.exit_code == 1 and "Traceback" not in result.output and "Error:" in result.output


def test_verify_and_info_report_missing_and_modified_files(tmp_path, ckpts, tok_dir):
    root = tmp_path / "models"
    reg = Registry(root)
    reg.add(ckpts[0], tok_dir)
    assert set(reg.verify("v1").values()) == {"ok"}
    (root / "versions/v1/model.pth").unlink()
    tj = root / "versions/v1/tokenizer/tokenizer.json"
    tj.write_bytes(tj.read_bytes().replace(b"<s>", b"<S>", 1))  # same size, different bytes
    report = reg.verify("v1")
    assert report["versions/v1/model.pth"] == "missing"
    assert report["versions/v1/tokenizer/tokenizer.json"] == "sha256 differs from the registry"
    assert report["versions/v1/tokenizer/tokenizer.model"] == "ok"

    result = CliRunner().invoke(main, ["models", "--root", str(root), "info", "v1"])
    assert result.exit_code == 1, result.output
    assert "BAD  versions/v1/model.pth" in result.output and "<- missing" in result.output
    assert "2 of 5 files of v1 failed verification" in result.output and "Traceback" not in result.output


def test_tokenizer_mismatch_is_an_error_and_leaves_the_registry_unchanged(tmp_path, ckpts, tok_dir):
    reg = Registry(tmp_path / "models")
    reg.add(ckpts[0], tok_dir)
    before = snapshot(tmp_path / "models")
    wrong = tmp_path / "wrong.pth"
    save_model(wrong, Transformer(model_config("tiny", ["vocab_size=1000"])), tokenizer_sha256="0" * 64)
    with pytest.raises(RegistryError, match="wrong tokenizer folder"):
        reg.add(wrong, tok_dir)
    other_tok = tmp_path / "tok-no-json"
    shutil.copytree(tok_dir, other_tok)
    (other_tok / "tokenizer.json").unlink()
    with pytest.raises(RegistryError, match="lacks tokenizer.json"):
        reg.add(ckpts[1], other_tok)
    with pytest.raises(RegistryError, match="not a readable checkpoint"):
        reg.add(tok_dir / "tokenizer.json", tok_dir)
    assert snapshot(tmp_path / "models") == before


def test_a_crash_during_add_leaves_the_registry_byte_identical(tmp_path, ckpts, tok_dir, monkeypatch):
    root = tmp_path / "models"
    reg = Registry(root)
    reg.add(ckpts[0], tok_dir)
    before = snapshot(root)

    fail_registry_writes(monkeypatch, OSError(28, "No space left on device"))
    with pytest.raises(RegistryError, match="registry unchanged: .*No space left"):
        reg.add(ckpts[1], tok_dir)
    monkeypatch.undo()
    assert snapshot(root) == before  # no half-written registry, no v2 folder, no temp files

    with pytest.raises(RegistryError, match="checkpoint not found"):  # a directory is not a checkpoint
        reg.add(ckpts[1].parent, tok_dir)
    assert snapshot(root) == before

    # a process killed after copying but before its registry write leaves a folder the registry ignores
    shutil.copytree(root / "versions" / "v1", root / "versions" / "v2")
    (root / "versions" / ".staging-v2").mkdir()
    assert [v.id for v in reg.versions()] == ["v1"]
    assert [p.name for p in reg.strays()] == [".staging-v2", "v2"]
    v2 = reg.add(ckpts[1], tok_dir)  # ... and the next add cleans it up and reuses the unissued number
    assert v2.id == "v2" and reg.strays() == []
    assert (root / "versions/v2/model.pth").read_bytes() == ckpts[1].read_bytes()
    assert set(reg.verify("v2").values()) == {"ok"}


def test_remove_refuses_the_champion_and_undoes_itself_if_the_write_fails(tmp_path, ckpts, tok_dir, monkeypatch):
    root = tmp_path / "models"
    reg = Registry(root)
    reg.add(ckpts[0], tok_dir)
    reg.add(ckpts[1], tok_dir)
    reg.promote("v1")
    with pytest.raises(RegistryError, match="v1 is the champion"):
        reg.remove("v1")
    before = snapshot(root)
    fail_registry_writes(monkeypatch, OSError("disk gone"))
    with pytest.raises(OSError, match="disk gone"):
        reg.remove("v2")
    monkeypatch.undo()
    assert snapshot(root) == before
    reg.remove("v1", force=True)
    assert reg.champion() is None and [v.id for v in reg.versions()] == ["v2"]


def test_add_reads_the_training_summary_from_the_run_folder(tmp_path, ckpts, tok_dir):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(ckpts[1], run / "model.pth")  # step 20
    sha = Tokenizer.load(tok_dir).sha256
    (run / "run.json").write_text(json.dumps({"tokenizer_sha256": sha, "device": "cpu", "processes": 2}))
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 10, "loss": 5.0, "elapsed": 3.5}, {"step": 10, "val_loss": 4.0, "val_bpb": 2.5},
        {"step": 20, "loss": 4.0, "elapsed": 7.25}, {"step": 20, "val_loss": 3.5, "val_bpb": 2.25},
        {"step": 30, "loss": 3.0, "elapsed": 11.0}]) + "\n")  # logged after the checkpoint: ignored
    v = Registry(tmp_path / "models").add(run / "model.pth", tok_dir, training={"notes": "tiny"},
                                          dataset_manifest_sha256="ab" * 32)
    assert v.training["seconds"] == 7.25 and v.training["hardware"] == "cpu x2" and v.training["notes"] == "tiny"
    assert v.metrics == {"val_bpb": 2.25} and v.dataset_manifest_sha256 == "ab" * 32


def test_cli_add_list_info_promote_champion_diff_remove(tmp_path, ckpts, tok_dir):
    root = str(tmp_path / "models")
    runner = CliRunner()

    def run(*args: str, code: int = 0) -> str:
        result = runner.invoke(main, ["models", "--root", root, *args])
        assert result.exit_code == code, result.output
        assert "Traceback" not in result.output
        return result.output

    assert "no versions" in run("list")
    metrics = tmp_path / "m.json"
    metrics.write_text(json.dumps({"val_bpb": 1.9, "grounded_qa": 0.25}))
    assert "added v1" in run("add", str(ckpts[0]), "--tokenizer", str(tok_dir), "--metrics", str(metrics))
    metrics.write_text(json.dumps({"val_bpb": 1.7, "grounded_qa": 0.5}))
    out = run("add", str(ckpts[2]), "--tokenizer", str(tok_dir), "--parent", "v1", "--metrics", str(metrics),
              "--notes", "deeper")
    assert "added v2" in out and "parent v1" in out
    metrics.write_text("[1, 2]")
    assert "expected a JSON object" in run("add", str(ckpts[1]), "--tokenizer", str(tok_dir), "--metrics",
                                           str(metrics), code=1)
    assert "not found" in run("add", str(tmp_path / "nope.pth"), "--tokenizer", str(tok_dir), code=1)

    lines = run("list").splitlines()
    assert lines[0].split() == ["id", "kind", "created", "(UTC)", "parent", "params", "val_bpb", "grounded_qa"]
    assert lines[2].split()[0] == "v2" and lines[2].split()[4] == "v1" and "0.5000" in lines[2]
    assert "no champion yet" in lines[-1]

    out = run("champion", "--auto")
    assert "champion: v2 (was none)" in out and "v2 has the highest grounded_qa 0.5" in out and CHAMPION_RULE in out
    assert run("list").splitlines()[2].startswith("*  v2")
    assert "champion: v1 (promoted by hand)" in run("promote", "1")
    assert "champion: v1 (promoted by hand)" in run("champion")
    assert "(unchanged)" not in run("champion", "--auto")
    assert "(unchanged)" in run("champion", "--auto")

    out = run("info", "v2")
    assert "lineage:           v2 <- v1" in out and "(champion)" in out and "n_layers = 3" in out
    assert out.count("ok   versions/v2/") == 5
    info = json.loads(run("info", "champion", "--json"))
    assert info["id"] == "v2" and info["champion"] and set(info["verify"].values()) == {"ok"}

    out = run("diff", "v1", "v2")
    assert "n_layers: 1 -> 3" in out and "val_bpb: 1.9000 -> 1.7000 (-0.2000)" in out and "model.pth: changed" in out
    assert "no differences" in run("diff", "v1", "1")
    assert "no version 'v9'" in run("diff", "v1", "v9", code=1)

    assert "v2 is the champion" in run("remove", "v2", code=1)
    assert "removed v2" in run("remove", "v2", "--force")
    assert "removed v1" in run("remove", "v1")
    assert "no versions" in run("list")
    assert "added v3" in run("add", str(ckpts[0]), "--tokenizer", str(tok_dir))
    assert "builder models list" in runner.invoke(main, ["models", "--help"]).output


def test_add_keeps_the_training_logs_of_the_run_and_of_its_base_run(tmp_path, tiny_base, tok_dir):
    """runs/ is not in git: the version folder keeps the loss logs the model card plots."""
    sft = tmp_path / "runs" / "sft"
    sft.mkdir(parents=True)
    shutil.copyfile(tiny_base, sft / "model.pth")
    base_run = json.loads((tiny_base.parent / "run.json").read_text())
    step = torch.load(tiny_base, weights_only=True)["step"]
    (sft / "run.json").write_text(json.dumps({**base_run, "kind": "sft", "parent_checkpoint": str(tiny_base),
                                              "base_step": 20}))
    lines = [{"step": s, "loss": 5.0 - s / 100} for s in (10, step, step + 10)] + [{"step": step, "val_loss": 4.8}]
    (sft / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 9')  # cut last line
    v = Registry(tmp_path / "models").add(sft / "model.pth", tok_dir)
    folder = tmp_path / "models" / "versions" / v.id
    kept = [json.loads(x) for x in (folder / "training_metrics.jsonl").read_text().splitlines()]
    assert kept == [r for r in lines if r["step"] <= step]  # nothing logged after the saved step, no torn line
    pre = [json.loads(x) for x in (folder / "pretrain_metrics.jsonl").read_text().splitlines()]
    assert pre and all(r["step"] <= 20 for r in pre) and any("loss" in r for r in pre)
    paths = {f["path"] for f in v.files}
    assert {f"versions/{v.id}/training_metrics.jsonl", f"versions/{v.id}/pretrain_metrics.jsonl"} <= paths
    assert all(s == "ok" for s in Registry(tmp_path / "models").verify(v.id).values())

    copied = tmp_path / "elsewhere" / "model.pth"  # out of its run folder: no logs, no error
    copied.parent.mkdir()
    shutil.copyfile(tiny_base, copied)
    v2 = Registry(tmp_path / "models").add(copied, tok_dir)
    assert not list((tmp_path / "models" / "versions" / v2.id).glob("*_metrics.jsonl"))
