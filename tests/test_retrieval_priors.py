"""The passage priors of the retrieval ranking (index format v4): group weights and the mention factor."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq

from source.retrieval import Index
from source.retrieval_build import build_index, prior_group


def test_priors_weigh_passages_by_group_and_mentions(tmp_path):
    """Each score is BM25F x coverage x the passage's prior: its group's weight (the release notes of
    the manual below its tutorial, WordNet below both) times 1 + 0.1 ln(1 + the manual sections that
    mention a docstring's API). Twins with the same words rank by that prior alone."""
    text = "Frobnicate the gadget at the given level."
    rows = [("docstring:zz.widget.frobnicate", "docstrings", "zz.widget.frobnicate", text, ""),  # first: ties go to it
            ("docstring:zz.gadget.frobnicate", "docstrings", "zz.gadget.frobnicate", text, ""),
            ("python-docs:whatsnew/9.9.rst.txt#gadgets", "python-docs", "Gadgets", "Knobs: " + text, "x"),
            ("python-docs:tutorial/gadget.rst.txt#gadgets", "python-docs", "Gadgets", "Knobs: " + text, "x"),
            ("python-docs:faq/gadget.rst.txt#polish", "python-docs", "Polish", "Use gadget.frobnicate(3).", "x"),
            ("wordnet:verb:1", "wordnet", "Gadgets", "Knobs: " + text, "x")]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.table({k: [r[i] for r in rows] for i, k in enumerate(("id", "source", "title", "text", "origin"))}
                            | {"license": ["PSF-2.0"] * len(rows)}), corpus / "train-00000.parquet")
    (corpus / "manifest.json").write_text("{}")
    assert prior_group("python-docs:whatsnew/3.8.rst.txt#x", "python-docs") == "python-docs/whatsnew"
    assert prior_group("python-docs:glossary.rst.txt#glossary", "python-docs") == "python-docs"
    assert prior_group("wordnet:noun:1", "wordnet") == "wordnet"
    meta = build_index(corpus, tmp_path / "ix", progress=False)
    weights = dict(zip(meta["groups"], meta["group_weights"]))
    assert weights["python-docs/whatsnew"] < weights["docstrings"] == 1.0 < weights["python-docs/tutorial"]
    assert weights["wordnet"] < 1.0
    ix = Index(tmp_path / "ix")
    prior = {ix.passage(d).id: p for d, p in enumerate(ix.prior.tolist())}
    assert prior["docstring:zz.gadget.frobnicate#0"] == 1 + 0.1 * math.log1p(1)  # one section mentions it
    assert prior["docstring:zz.widget.frobnicate#0"] == 1.0
    assert [p.id for p in ix.search("frobnicate gadget level", 2, sources=("docstrings",))] == [
        "docstring:zz.gadget.frobnicate#0", "docstring:zz.widget.frobnicate#0"]
    ids = [p.id for p in ix.search("knobs gadgets frobnicate", 6)]
    tutorial = ids.index("python-docs:tutorial/gadget.rst.txt#gadgets#0")
    assert tutorial < ids.index("python-docs:whatsnew/9.9.rst.txt#gadgets#0") and tutorial < ids.index("wordnet:verb:1#0")
