"""web_static/retrieval.js is the exact port of source/retrieval.py's search: same docs, same order,
same scores (bit for bit, unrounded) on every hand-written natural question, their follow-up queries
and hostile strings, over a real index (pydoc topics + WordNet + stdlib docstrings + a user file), in
node. The docstrings carry the headings of the pydoc topics that mention them at half a text word's
weight, so fractional frequencies and the coverage factor are part of what is compared, and every
score carries its passage's prior (WordNet's source weight, the docstrings' mention factor)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from source.corpus.build import build_corpus
from source.prompt import retrieval_query
from source.retrieval import Index
from source.retrieval_build import build_index

REPO = Path(__file__).resolve().parent.parent
NODE = shutil.which("node")
HOSTILE = ["", "x", "日本語", "naïve Café", "the of and", "json.dumps()", "os.path.join()", "builtins.str.zfill",
           "__init__", "constructor", "toString __proto__ hasOwnProperty", "valueOf", "İstanbul ǅ ß ﬁ", "a" * 300,
           " ".join(f"word{i}" for i in range(80)), "\u0301\u200b", "🙂 emoji", "x.y.z.w", "_", "1 2 3 42"]


@pytest.fixture(scope="module")
def index(tiny_workspace, tmp_path_factory) -> Path:
    """The tiny workspace's corpus plus a user file with identifiers and headings, indexed."""
    root = tmp_path_factory.mktemp("parity")
    docs = root / "docs"
    docs.mkdir()
    (docs / "notes.jsonl").write_text("".join(json.dumps(n) + "\n" for n in [
        {"title": "json.dumps", "text": "json.dumps(obj)\n\nSerialize obj to a JSON formatted str."},
        {"title": "posixpath.join", "text": "Join two or more pathname components, inserting '/' as needed."},
        {"title": "constructor", "text": "constructor (also: ctor)\n\nA function that creates an object."}]))
    (root / "recipe.json").write_text(json.dumps({"name": "parity", "sources": [
        {"name": "pydoc-topics", "license": "PSF-2.0"}, {"name": "wordnet", "license": "WordNet-3.0"},
        {"name": "docstrings", "license": "PSF-2.0"},
        {"name": "docs", "reader": "user", "path": "docs", "license": "CC0-1.0"}]}))
    build_corpus(root / "recipe.json", root / "corpus", limit_per_source=4000, val_fraction=0.05, progress=False)
    meta = build_index(root / "corpus", root / "index", progress=False)
    assert meta["anchored"] > 20 and meta["freq_scale"] == 2  # half-weight anchor words are in the postings
    return root / "index"


def queries() -> list[str]:
    out = []
    for line in (REPO / "datasets/eval/natural.jsonl").read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        out.append(item["question"])
        if item["history"]:
            out.append(retrieval_query([*item["history"], {"role": "user", "content": item["question"]}]))
    return out + HOSTILE


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_js_search_equals_python_search(index):
    qs = queries()
    assert len(qs) >= 300
    ix = Index(index)
    run = subprocess.run([NODE, str(REPO / "tests/js/search.mjs"), str(index), "3"], input=json.dumps(qs),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    js = json.loads(run.stdout)
    assert len(js) == len(qs)
    found = 0
    for q, got in zip(qs, js):
        want = {"ranked": [list(r) for r in ix.ranked(q, 3)], "ids": [p.id for p in ix.search(q, 3)]}
        assert got == want, q  # same docs, same order, same float scores
        found += bool(want["ids"])
    assert found >= 0.8 * len(qs)  # the queries do find passages: equality is not between empty lists
    named = sum(bool(ix.named(q)) for q in qs)
    assert named >= 100  # and the name bonus takes part in many of them
    # the priors take part: WordNet's weight, docstrings with mentions, and passages at 1
    assert len(set(ix.prior.tolist())) >= 3 and ix.prior.min() < 1 < ix.prior.max()
    ranked = {d for q in qs for d, _ in ix.ranked(q, 3)}
    assert len({float(ix.prior[d]) for d in ranked}) >= 3  # ... in the very passages compared
