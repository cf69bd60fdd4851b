"""`builder release` end to end on a tiny profile in a scratch checkout: every stage runs, then is cached."""

import json
import time

import click
import pytest

from builder import export_gates
from builder.cli import main
from builder.release import Profile, Release, select

pytestmark = pytest.mark.slow

TRAINING = {"tokenizer", "pretrain", "sft-data", "sft", "registry"}


def _release(profile, calls, start=None, only=None):
    def cli(args):
        calls.append(args[0])
        main.main(args=args, prog_name="builder", standalone_mode=False)

    r = Release(profile, cli, log=lambda _: None)
    r.execute(*select(start, only))
    return r, r.publish(time.perf_counter())


def test_release_runs_every_stage_then_caches_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a scratch checkout: datasets/, runs/, models/, dist/ all land here
    recipe = tmp_path / "datasets" / "recipes" / "default.json"
    recipe.parent.mkdir(parents=True)
    recipe.write_text(json.dumps({"name": "default", "sources": [
        {"name": "pydoc-topics", "weight": 1.0, "license": "PSF-2.0"}]}))
    profile = Profile("test", "tiny", 1000, 20, 20, 1e-3, "models", "runs", "datasets/built/sft", None, 10)

    calls: list[str] = []
    r, summary = _release(profile, calls)
    assert [s["status"] for s in summary["stages"]] == ["ran"] * 11, summary["stages"]
    pages = tmp_path / "dist" / "pages"
    for name in ("index.html", ".nojekyll", "docs/index.html"):
        assert (pages / name).is_file(), name
    manifest = json.loads((tmp_path / "dist" / "release-manifest.json").read_text())
    assert manifest["champion"] == "v1" and all(g["passed"] for g in manifest["gates"] if g["required"])
    lock = json.loads((tmp_path / "models" / "release.lock.json").read_text())
    assert lock["champion"] == "v1"

    calls.clear()  # nothing changed: training comes from the lock, data/index/export/card from the state file
    r, summary = _release(profile, calls)
    status = {s["stage"]: s for s in summary["stages"]}
    assert all(status[n]["status"] == "cached" for n in TRAINING | {"data", "index", "export", "card"}), status
    assert "lock" in status["sft"]["note"]
    assert calls == ["site", "docs"]

    calls.clear()  # --from export re-runs export and everything after it, nothing before
    _release(profile, calls, start="export")
    assert calls == ["export", "card", "site", "docs"]

    before = {p.relative_to(pages): p.stat().st_mtime_ns for p in pages.rglob("*")}
    monkeypatch.setattr(export_gates, "INT8_SIZE_RATIO", 0.01)  # an impossible bar: the gate must fail
    with pytest.raises(click.ClickException, match="size vs fp32"):
        _release(profile, calls, only="export")
    assert {p.relative_to(pages): p.stat().st_mtime_ns for p in pages.rglob("*")} == before  # nothing published

    recipe.write_text(recipe.read_text().replace('"weight": 1.0', '"weight": 2.0'))
    assert r.training_cached() is None  # a changed recipe invalidates the committed champion's lock
