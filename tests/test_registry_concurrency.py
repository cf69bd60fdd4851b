"""The registry under concurrent writers: real `builder models` processes racing on one registry folder."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from builder.cli import main
from source.checkpoint import save_model
from source.config import model_config
from source.model import Transformer
from source.registry import Registry
from source.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]

# Each racer imports everything first, says it is ready, then waits for the start file: the processes race on
# the registry itself, not on who finishes importing torch first.
RACER = r"""
import sys, time
from pathlib import Path
import source.checkpoint, source.registry
from builder.cli import main
ready, go = Path(sys.argv[1]), Path(sys.argv[2])
(ready / sys.argv[3]).touch()
while not go.exists():
    time.sleep(0.001)
main(sys.argv[4:])
"""


@pytest.fixture(scope="module")
def ckpt(tiny_workspace, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = Transformer(model_config("tiny", ["vocab_size=1000", "n_layers=1"]))
    path = tmp_path_factory.mktemp("race") / "run" / "model.pth"
    save_model(path, model, tokenizer_sha256=Tokenizer.load(tiny_workspace["tokenizer"]).sha256, step=5,
               tokens=500, params=model.num_params())
    return path


def race(tmp_path: Path, jobs: list[list[str]]) -> list[tuple[int, str]]:
    """Start one process per job, let them all go at once, return [(returncode, stdout + stderr)]."""
    ready, go = tmp_path / "ready", tmp_path / "go"
    ready.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(ready), str(go), str(i), *job], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i, job in enumerate(jobs)]
    deadline = time.time() + 300
    while len(list(ready.iterdir())) < len(jobs) and time.time() < deadline:
        time.sleep(0.05)
    go.touch()
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    return [(p.returncode, out) for p, out in zip(procs, outputs)]


def test_concurrent_adds_promote_and_remove_each_keep_their_result(tmp_path, ckpt, tiny_workspace):
    root, tok = tmp_path / "models", str(tiny_workspace["tokenizer"])
    reg = Registry(root)
    reg.add(ckpt, tok)  # v1: the one the racers promote
    reg.add(ckpt, tok)  # v2: the one they remove
    models = ["models", "--root", str(root)]
    adds = 4
    results = race(tmp_path, [[*models, "add", str(ckpt), "--tokenizer", tok] for _ in range(adds)]
                   + [[*models, "promote", "v1"], [*models, "remove", "v2"]])
    assert all(code == 0 for code, _ in results), results
    added = [re.search(r"added (v\d+)", out).group(1) for _, out in results[:adds]]
    assert len(set(added)) == adds and "v2" not in added  # distinct, and never a reused number

    state = reg.load()  # registry.json parses and holds every change: no writer overwrote another's
    assert sorted(v.id for v in state["versions"]) == sorted(["v1", *added]) and state["champion"] == "v1"
    assert state["next_id"] == 3 + adds and not reg.strays()
    for vid in added:  # every reported version exists on disk, byte for byte
        assert set(reg.verify(vid).values()) == {"ok"}
        info = CliRunner().invoke(main, [*models, "info", vid])
        assert info.exit_code == 0 and "BAD" not in info.output, info.output
    assert not (root / "versions" / "v2").exists()
