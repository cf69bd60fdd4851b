"""Shared fixtures: a small real corpus and a real tokenizer trained on it, built once per session."""

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory) -> dict[str, Path]:
    """pydoc topics + a slice of WordNet (when installed) -> Parquet corpus -> BPE tokenizer (vocab 1000)."""
    from source.corpus.build import build_corpus, iter_texts
    from source.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("workspace")
    recipe = root / "recipe.json"
    recipe.write_text(json.dumps({"name": "tiny", "sources": [
        {"name": "pydoc-topics", "weight": 1.0, "license": "PSF-2.0"},
        {"name": "wordnet", "weight": 1.0, "license": "WordNet-3.0"},
    ]}))
    data = root / "corpus"
    build_corpus(recipe, data, limit_per_source=3000, val_fraction=0.05, progress=False)
    tokenizer = root / "tokenizer"
    train_tokenizer(iter_texts(data, "train"), tokenizer, vocab_size=1000)
    return {"root": root, "data": data, "tokenizer": tokenizer}


@pytest.fixture(scope="session")
def tiny_index(tiny_workspace, tmp_path_factory) -> Path:
    """A real retrieval index folder over the tiny workspace's corpus."""
    from source.retrieval_build import build_index

    path = tmp_path_factory.mktemp("index") / "index"
    build_index(tiny_workspace["data"], path, progress=False)
    return path


@pytest.fixture(scope="session")
def tiny_base(tiny_workspace, tmp_path_factory) -> Path:
    """A tiny model pretrained for 40 steps on the tiny workspace: the starting point for SFT tests."""
    import os

    from click.testing import CliRunner

    from builder.cli import main

    root = tmp_path_factory.mktemp("base")
    cwd = os.getcwd()
    os.chdir(root)  # token shards go under ./runs
    try:
        result = CliRunner().invoke(main, ["pretrain", "--preset", "tiny", "--data", str(tiny_workspace["data"]),
                                           "--tokenizer", str(tiny_workspace["tokenizer"]), "--out", str(root / "run"),
                                           "--set", "max_steps=40", "--set", "eval_every=40", "--no-samples"])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    return root / "run" / "model.pth"


@pytest.fixture(scope="session")
def tiny_export(tiny_base, tiny_workspace, tiny_index, tmp_path_factory) -> Path:
    """`builder export --q4 --gguf` of the tiny model (HF folder, fp32/int8/q4 ONNX, GGUF, browser index), gates passed."""
    from builder.export import export_model

    out = tmp_path_factory.mktemp("export") / "tiny"
    export_model(tiny_base, tiny_workspace["tokenizer"], out, index_path=tiny_index, q4=True, gguf=True, log=lambda _: None)
    return out
