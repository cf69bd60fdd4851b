"""Retrieval: real corpora -> real SQLite FTS5 files -> search. No mocks."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from builder.cli import main
from source.corpus.build import build_corpus, iter_records
from source.retrieval import (Index, Passage, build_index, chunk_text, construct_keywords, fts_query, other_number,
                              title_candidates, title_key)
from source.tokenizer import format_context

FROB = """The Frobnicator Manual

To frobnicate a widget, call widget.frobnicate(level) with a level between one and eleven. \
Higher levels frobnicate harder but take longer; level eleven is reserved for emergencies.

""" + "\n\n".join(
    f"Section {i}. The gizmo subsystem keeps a queue of pending tweaks. Each tweak is applied in order, "
    f"and a failed tweak is retried {i} times before the queue gives up. Tweaks never block readers."
    for i in range(12))
NOTES = [{"title": "widget.frobnicate",
          "text": "widget.frobnicate(level)\n\nFrobnicate the widget at the given level."},
         {"title": "Quokka care", "text": "Quokkas eat leaves, grasses and stems. Keep them cool in summer."},
         {"title": "Zeppelin logbook", "text": "The airship left the hangar at dawn and reached the coast by noon."}]
NASTY = ['json.dumps()', '"', '""', "'", 'AND', 'OR NOT', 'NEAR(a b)', '*', 'frob*', '-', '-frobnicate',
         'title:frobnicate', '^frob', '(', ')', '{a b}', ':', 'a"b', "\\", "+", "\x00", "é ü 数据",
         "\u0301", " ", "", "?!.,;", "the of and", "x" * 5000, " ".join(["word"] * 400)]


def squash(s: str) -> str:
    return "".join(s.split())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """pydoc topics (30) + a little chitchat + a user folder with a weight of 2 (repeated ids)."""
    root = tmp_path_factory.mktemp("retrieval")
    docs = root / "docs"
    docs.mkdir()
    (docs / "frob.md").write_text(FROB)
    (docs / "notes.jsonl").write_text("".join(json.dumps(n) + "\n" for n in NOTES))
    (root / "recipe.json").write_text(json.dumps({"name": "t", "sources": [
        {"name": "pydoc-topics", "license": "PSF-2.0"},
        {"name": "docs", "reader": "user", "path": "docs", "license": "CC0-1.0", "weight": 2.0},
        {"name": "chitchat", "license": "MIT"}]}))
    build_corpus(root / "recipe.json", root / "corpus", limit_per_source=30, val_fraction=0.2, progress=False)
    return root / "corpus"


@pytest.fixture(scope="module")
def index_path(corpus, tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("idx") / "index.sqlite"
    build_index(corpus, db, progress=False)
    return db


def records(data: Path) -> dict[str, dict]:
    return {r["id"]: r for split in ("train", "val") for r in iter_records(data, split)}


# ----------------------------------------------------------------------------- chunking

@pytest.mark.parametrize("max_chars", [50, 120, 600])
def test_chunks_respect_bound_keep_every_character_and_cut_between_words(max_chars):
    text = FROB + "\n\nA sentence without an end " * 30 + "\nline\n" + "unbroken" * 40 + " tail."
    chunks = chunk_text(text, max_chars)
    assert all(0 < len(c) <= max_chars and c == c.strip() for c in chunks)
    assert squash("".join(chunks)) == squash(text)
    pos = 0
    for c in chunks:  # each chunk is a slice of the text; cuts fall on whitespace unless a word is too long
        start = text.index(c, pos)
        assert text[pos:start].strip() == ""
        end = start + len(c)
        if end < len(text) and not text[end].isspace():
            assert len(c) == max_chars and " " not in c and "\n" not in c  # hard cut inside "unbroken..."
        pos = end
    assert chunk_text("short", 600) == ["short"] and chunk_text("  \n ", 600) == []


def test_chunks_prefer_paragraph_then_sentence_breaks():
    para = "First paragraph has some words. " * 5
    chunks = chunk_text(f"{para.strip()}\n\n{para.strip()}", 250)
    assert chunks == [para.strip(), para.strip()]
    first = "One two three four five six seven eight nine ten."
    rest = "Eleven twelve thirteen fourteen fifteen sixteen seventeen"
    assert chunk_text(f"{first} {rest}", 70) == [first, rest]  # the sentence end, not the last space
    assert chunk_text("ab cd. " + "x " * 40, 70)[0].endswith("x")  # a break in the first half is too early


# ----------------------------------------------------------------------------- build

def test_index_covers_every_record_with_stable_ids(corpus, index_path, tmp_path):
    recs = records(corpus)
    con = sqlite3.connect(index_path)
    rows = con.execute("SELECT id, title, source, origin, text FROM passages ORDER BY rowid").fetchall()
    by_record: dict[str, list[tuple]] = {}
    for row in rows:
        rid, n = row[0].rsplit("#", 1)
        by_record.setdefault(rid, []).append((int(n), *row[1:]))
    assert {r["source"] for r in recs.values()} >= {"pydoc-topics", "docs"}
    expected = {i for i, r in recs.items() if r["source"] != "chitchat"}  # chitchat is off by default
    assert set(by_record) == expected
    for rid, parts in by_record.items():
        r = recs[rid]
        assert [p[0] for p in sorted(parts)] == list(range(len(parts)))  # ids "{record}#0", "#1", ...
        assert all(p[1] == r["title"] and p[2] == r["source"] and p[3] == r["origin"] for p in parts)
        assert all(len(p[4]) <= 600 for p in parts)
        assert squash("".join(p[4] for p in sorted(parts))) == squash(r["text"])
    assert len(by_record["user:frob.md:0"]) > 1  # the manual is long enough to be cut

    again = tmp_path / "again.sqlite"
    build_index(corpus, again, progress=False)
    assert sqlite3.connect(again).execute("SELECT id, text FROM passages ORDER BY id").fetchall() == \
        con.execute("SELECT id, text FROM passages ORDER BY id").fetchall()


def test_meta_and_stats(corpus, tmp_path):
    stats = build_index(corpus, tmp_path / "i.sqlite", sources=("docs",), max_chars=200, progress=False)
    assert set(stats["counts"]) == {"docs"} and stats["passages"] == stats["counts"]["docs"]
    assert stats["bytes"] == (tmp_path / "i.sqlite").stat().st_size and stats["seconds"] >= 0
    ix = Index(tmp_path / "i.sqlite")
    assert ix.meta["manifest_sha256"] == hashlib.sha256((corpus / "manifest.json").read_bytes()).hexdigest()
    assert ix.meta["max_chars"] == 200 and ix.meta["counts"] == stats["counts"] and ix.meta["created"]
    assert len(ix) == stats["passages"] and ix.meta["records"] == len(NOTES) + 1
    assert {p.source for p in ix.search("frobnicate the widget gizmo", k=10)} == {"docs"}


def test_failed_build_leaves_the_old_index(corpus, index_path, tmp_path):
    db = tmp_path / "index.sqlite"
    build_index(corpus, db, progress=False)
    before = db.read_bytes()
    with pytest.raises(FileNotFoundError, match="builder data build"):
        build_index(tmp_path / "no-corpus", db, progress=False)
    with pytest.raises(ValueError, match="nothing to index"):
        build_index(corpus, db, sources=("no-such-source",), progress=False)
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.sqlite"]  # no temp files left behind
    assert Index(db).get("user:frob.md:0#0") is not None


# ----------------------------------------------------------------------------- search

def test_identifier_and_natural_language_queries(index_path):
    ix = Index(index_path)
    for q in ("widget.frobnicate", "What does widget.frobnicate() do?", "widget frobnicate"):
        assert ix.search(q)[0].id == "user:notes.jsonl:1#0", q
    top = ix.search("how many times is a failed tweak retried by the gizmo queue?", k=3)
    assert top[0].id.startswith("user:frob.md:0#")
    assert "Quokkas" in ix.search("what do quokkas eat")[0].text
    con = sqlite3.connect(index_path)
    for (title,) in con.execute("SELECT title FROM passages WHERE source = 'pydoc-topics' AND chunk = 0"):
        assert ix.search(title, k=1)[0].title == title  # "for", "with": a stop word alone still searches
    hits = ix.search("frobnicate gizmo tweak widget", k=5)
    assert len({h.id.rsplit("#", 1)[0] for h in hits}) == len(hits)  # one passage per record
    assert all(isinstance(h, Passage) and h.score > 0 for h in hits)
    assert ix.search("zzzqqq nonexistentword") == [] and ix.search("frobnicate", k=0) == []


def test_define_finds_the_wordnet_entry(tiny_workspace, tmp_path):
    db = tmp_path / "w.sqlite"
    build_index(tiny_workspace["data"], db, progress=False)
    ix = Index(db)
    con = sqlite3.connect(db)
    titles = [t for (t,) in con.execute("SELECT title FROM passages WHERE source = 'wordnet' AND title GLOB "
                                        "'[a-z][a-z][a-z][a-z]*' AND title NOT GLOB '*[^a-z]*' LIMIT 40")]
    assert len(titles) >= 20
    for t in titles:
        for q in (f"define {t}", f"What does '{t}' mean?"):
            assert title_key(ix.search(q)[0].title) == t, q


def pydoc_topics_and_notes_index(tmp_path: Path, notes: list[dict]) -> Index:
    """A real index of every pydoc topic plus `notes` as the user file docs/notes.jsonl (line n is
    record user:notes.jsonl:n)."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.jsonl").write_text("".join(json.dumps(n) + "\n" for n in notes))
    (tmp_path / "recipe.json").write_text(json.dumps({"name": "t", "sources": [
        {"name": "pydoc-topics", "license": "PSF-2.0"},
        {"name": "docs", "reader": "user", "path": "docs", "license": "CC0-1.0"}]}))
    build_corpus(tmp_path / "recipe.json", tmp_path / "corpus", val_fraction=0.1, progress=False)
    build_index(tmp_path / "corpus", tmp_path / "ix.sqlite", progress=False)
    return Index(tmp_path / "ix.sqlite")


def test_keywords_named_as_constructs_find_the_python_topic(tmp_path):
    """"for", "while", "with" are stop words; "the for statement" still names the pydoc topic "for",
    and a record of another source titled "while" is not pulled in by the keyword."""
    ix = pydoc_topics_and_notes_index(tmp_path, [{"title": "while", "text": "While the kettle boils, write the "
                                                   "statement of accounts and loop the ribbon twice."}])
    assert construct_keywords("How does the for statement work in Python?") == ["for"]
    assert construct_keywords("Is there a good name for a variable?") == []  # "for" + "a": not a construct
    assert construct_keywords("for") == [] and construct_keywords("try statements, try blocks") == ["try"]
    for kw, q in [("for", "How does the for statement work in Python?"), ("while", "How do I write a while loop?"),
                  ("with", "What does the with statement do?"), ("lambda", "What is a lambda expression?"),
                  ("try", "Explain try clauses."), ("return", "the return statement")]:
        assert ix.search(q)[0].id == f"pydoc:topic:{kw}#0", q
    # the user note titled "while" has the words too, and your own files come first among exact titles,
    # but the keyword is looked up among Python titles only
    assert ix.search("the while statement")[0].id == "pydoc:topic:while#0"
    assert ix.search("while")[0].id == "user:notes.jsonl:1#0"  # named as a title, your own file comes first


def test_titles_match_in_either_number_and_without_context_words(tmp_path):
    """"What is slicing in Python?" names the pydoc topic "slicings"; "regular expressions" names an
    entry titled "regular expression". Without the exact-title variants, notes that repeat the query's
    words in their titles rank first."""
    ix = pydoc_topics_and_notes_index(tmp_path, [
        {"title": "regular expression", "text": "A pattern that matches a set of strings."},
        {"title": "Slicing Python bread and Python cheese", "text": "Slicing in Python kitchens."},
        {"title": "Regular expressions of regular folk", "text": "Regular expressions, said regularly."}])
    pairs = [("expressions", "expression"), ("slicing", "slicings"), ("class", "classes"),
             ("library", "libraries"), ("box", "boxes"), ("key", "keys")]
    for a, b in pairs:
        assert other_number(a) == b and other_number(b) == a, (a, b)
    assert title_candidates("What is slicing in Python?") == ["slicing python", "slicing pythons", "slicing",
                                                             "slicings"]
    assert title_candidates("What does json.dumps do?") == ["json dumps"]  # json.dump is another function
    assert ix.search("What is slicing in Python?")[0].id == "pydoc:topic:slicings#0"
    assert ix.search("What are regular expressions?")[0].id == "user:notes.jsonl:1#0"
    assert ix.search("What are regular expressions in Python?")[0].id == "user:notes.jsonl:1#0"


def test_fts_syntax_in_queries_never_raises(index_path):
    ix = Index(index_path)
    for q in NASTY:
        got = ix.search(q, k=3)
        assert isinstance(got, list) and len(got) <= 3
    assert ix.search("") == [] and ix.search("?!.,;") == [] and ix.search("*") == []
    assert fts_query('json.dumps() AND "x" -y*') == '"json" OR "dumps" OR "x" OR "y"'
    assert fts_query("What is the for statement?") == '"statement"' and fts_query("for") == '"for"'
    assert title_candidates("What does json.dumps() do?") == ["json dumps"]
    assert title_candidates("define ephemeral") == ["ephemeral", "ephemerals"]
    assert title_candidates("with") == ["with", "withs"] and title_candidates("?!") == []
    assert ix.search('-frobnicate')[0].source == "docs"  # the minus is not NOT


def test_source_filter(index_path):
    ix = Index(index_path)
    assert {p.source for p in ix.search("frobnicate widget statement", k=10, sources=("docs",))} == {"docs"}
    assert all(p.source == "pydoc-topics" for p in ix.search("frobnicate statement", k=10, sources=("pydoc-topics",)))
    assert ix.search("widget.frobnicate", sources=("pydoc-topics",)) == [] or \
        ix.search("widget.frobnicate", sources=("pydoc-topics",))[0].source == "pydoc-topics"
    assert ix.search("frobnicate", sources=()) == [] and ix.search("frobnicate", sources=("nope",)) == []
    assert ix.search("conversation", sources=("chitchat",)) == []  # not indexed by default


def test_get_len_to_dict_and_threads(index_path):
    ix = Index(index_path)
    p = ix.get("user:notes.jsonl:2#0")
    assert p.title == "Quokka care" and p.source == "docs" and p.origin.endswith("notes.jsonl")
    assert ix.get("user:notes.jsonl:2#99") is None and ix.get("") is None
    assert len(ix) == sqlite3.connect(index_path).execute("SELECT count(*) FROM passages").fetchone()[0]
    d = p.to_dict()
    assert set(d) == {"id", "title", "source", "origin", "text", "score"}
    assert format_context([d]).startswith("[1] Quokka care\nQuokkas eat")
    errors = []

    def worker():
        try:
            for _ in range(20):
                assert ix.search("widget.frobnicate")[0].id == "user:notes.jsonl:1#0"
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_missing_or_corrupt_index_is_a_clear_error(tmp_path, index_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.sqlite.*builder index build"):
        Index(tmp_path / "nope.sqlite")
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not a database " * 100)
    with pytest.raises(ValueError, match=r"bad\.sqlite.*builder index build"):
        Index(bad)
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(ValueError, match=r"other\.sqlite"):
        Index(other)
    before = index_path.read_bytes()
    Index(index_path).search("frobnicate")  # read-only: searching never writes
    assert index_path.read_bytes() == before


# ----------------------------------------------------------------------------- CLI

def test_cli_build_and_search(corpus, tmp_path):
    db = tmp_path / "cli.sqlite"
    runner = CliRunner()
    r = runner.invoke(main, ["index", "build", "--data", str(corpus), "--out", str(db), "--quiet",
                             "--max-chars", "300"])
    assert r.exit_code == 0, r.output
    assert re.search(r"docs\s+\d+", r.stdout) and "total" in r.stdout and "chitchat" not in r.stdout
    r = runner.invoke(main, ["index", "search", "What does widget.frobnicate do?", "--index", str(db), "-k", "2"])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("[1] user:notes.jsonl:1#0") and "[2]" in r.stdout and "[3]" not in r.stdout
    r = runner.invoke(main, ["index", "search", "zzzqqq", "--index", str(db)])
    assert r.exit_code == 0 and "no passages" in r.stdout
    if any(r["source"] == "chitchat" for r in records(corpus).values()):  # when chitchat-dataset is installed
        r = runner.invoke(main, ["index", "build", "--data", str(corpus), "--out", str(tmp_path / "c.sqlite"),
                                 "--sources", "chitchat", "--quiet"])
        assert r.exit_code == 0 and "chitchat" in r.stdout


def test_cli_user_errors(tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["index", "build", "--data", str(tmp_path / "missing"),
                             "--out", str(tmp_path / "i.sqlite")])
    assert r.exit_code == 1 and "builder data build" in r.output and "Traceback" not in r.output
    r = runner.invoke(main, ["index", "search", "x", "--index", str(tmp_path / "i.sqlite")])
    assert r.exit_code == 1 and "builder index build" in r.output
    r = runner.invoke(main, ["index", "build", "--help"])
    assert r.exit_code == 0 and "Examples" in r.output and "builder index build" in r.output
    assert "search" in runner.invoke(main, ["index", "--help"]).output
