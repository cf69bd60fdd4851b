"""Retrieval: real corpora -> real index folders -> search. No mocks."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from builder.cli import main
from source.corpus.build import build_corpus, iter_records
from source.retrieval import Index, Passage, content_words, words
from source.retrieval_build import build_index, chunk_text, record_names
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
    out = tmp_path_factory.mktemp("idx") / "index"
    build_index(corpus, out, progress=False)
    return out


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

def all_passages(ix: Index) -> list[Passage]:
    return [ix.passage(d) for d in range(len(ix))]


def test_index_covers_every_record_with_stable_ids(corpus, index_path, tmp_path):
    recs = records(corpus)
    ix = Index(index_path)
    by_record: dict[str, list[tuple]] = {}
    for p in all_passages(ix):
        rid, n = p.id.rsplit("#", 1)
        by_record.setdefault(rid, []).append((int(n), p.title, p.source, p.origin, p.text))
    assert {r["source"] for r in recs.values()} >= {"pydoc-topics", "docs"}
    expected = {i for i, r in recs.items() if r["source"] != "chitchat"}  # chitchat is off by default
    assert set(by_record) == expected
    for rid, parts in by_record.items():
        r = recs[rid]
        assert [p[0] for p in parts] == list(range(len(parts)))  # ids "{record}#0", "#1", ... consecutive
        assert all(p[1] == r["title"] and p[2] == r["source"] and p[3] == r["origin"] for p in parts)
        assert all(len(p[4]) <= 600 for p in parts)
        assert squash("".join(p[4] for p in parts)) == squash(r["text"])
    assert len(by_record["user:frob.md:0"]) > 1  # the manual is long enough to be cut
    again = tmp_path / "again"
    build_index(corpus, again, progress=False)
    files = sorted(p.relative_to(index_path) for p in index_path.rglob("*") if p.is_file() and p.name != "meta.json")
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file() and p.name != "meta.json")
    assert all((index_path / f).read_bytes() == (again / f).read_bytes() for f in files)  # a rebuild is identical


def test_meta_and_stats(corpus, tmp_path):
    stats = build_index(corpus, tmp_path / "i", sources=("docs",), max_chars=200, progress=False)
    assert set(stats["counts"]) == {"docs"} and stats["passages"] == stats["counts"]["docs"]
    on_disk = sum(p.stat().st_size for p in (tmp_path / "i").rglob("*") if p.is_file())
    assert stats["bytes"]["total"] == on_disk and stats["seconds"] >= 0
    ix = Index(tmp_path / "i")
    assert ix.meta["manifest_sha256"] == hashlib.sha256((corpus / "manifest.json").read_bytes()).hexdigest()
    assert ix.meta["max_chars"] == 200 and ix.meta["counts"] == stats["counts"] and ix.meta["created"]
    assert len(ix) == stats["passages"] and ix.meta["records"] == len(NOTES) + 1
    assert {p.source for p in ix.search("frobnicate the widget gizmo", k=10)} == {"docs"}


def test_failed_build_leaves_the_old_index(corpus, tmp_path):
    out = tmp_path / "index"
    build_index(corpus, out, progress=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(FileNotFoundError, match="builder data build"):
        build_index(tmp_path / "no-corpus", out, progress=False)
    with pytest.raises(ValueError, match="nothing to index"):
        build_index(corpus, out, sources=("no-such-source",), progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no temp folders left behind
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a retrieval index folder"):  # never replace someone's folder
        build_index(corpus, tmp_path / "notes", progress=False)
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


def test_record_names_come_from_the_layouts_the_readers_write():
    assert record_names("for", 'The "for" statement\n*******************\n\nThe "for" statement is') == \
        ['The "for" statement']
    assert record_names("recursion", "recursion (also: recurse, recursive)\n\n<programming> When a function") == \
        ["recurse", "recursive"]
    assert record_names("long-winded", 'long-winded (adjective): using too many words. Also: verbose, wordy. '
                                       'Examples: "a long-winded speaker".') == ["verbose", "wordy"]
    assert record_names("Quokka care", "Quokkas eat leaves. Also: they sleep.") == []


# ----------------------------------------------------------------------------- search

def test_identifier_and_natural_language_queries(index_path):
    ix = Index(index_path)
    for q in ("widget.frobnicate", "What does widget.frobnicate() do?", "widget frobnicate"):
        assert ix.search(q)[0].id == "user:notes.jsonl:1#0", q
    top = ix.search("how many times is a failed tweak retried by the gizmo queue?", k=3)
    assert top[0].id.startswith("user:frob.md:0#")
    assert "Quokkas" in ix.search("what do quokkas eat")[0].text
    hits = ix.search("frobnicate gizmo tweak widget", k=5)
    assert len({h.id.rsplit("#", 1)[0] for h in hits}) == len(hits)  # one passage per record
    assert all(isinstance(h, Passage) and h.score > 0 for h in hits)
    assert ix.search("zzzqqq nonexistentword") == [] and ix.search("frobnicate", k=0) == []


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
    build_index(tmp_path / "corpus", tmp_path / "ix", progress=False)
    return Index(tmp_path / "ix")


def test_names_spelled_by_the_query_win_over_notes_that_repeat_its_words(tmp_path):
    """A heading is a name ('The "for" statement'), stems match across number ("regular
    expressions"), identifiers match only as written (json.dumps is not json.dump)."""
    ix = pydoc_topics_and_notes_index(tmp_path, [
        {"title": "regular expression", "text": "A pattern that matches a set of strings."},
        {"title": "Work log", "text": "The statement of work for the Python team went out; statements follow."},
        {"title": "Regular expressions of regular folk", "text": "Regular expressions, said regularly."},
        {"title": "json.dump", "text": "json.dump(obj, fp)\n\nSerialize obj as a JSON stream to fp."},
        {"title": "json.dumps", "text": "json.dumps(obj)\n\nSerialize obj to a JSON formatted str."},
        {"title": "Slicing Python bread", "text": "Slicing bread, Python style."}])
    named = {ix.passage(d).id for d in ix.named("How does the for statement work in Python?")}
    assert "pydoc:topic:for#0" in named and "user:notes.jsonl:2#0" not in named  # its heading is a name
    assert ix.search("What are regular expressions?")[0].id == "user:notes.jsonl:1#0"
    assert ix.search("What does json.dumps do?")[0].id == "user:notes.jsonl:5#0"
    assert ix.search("What does json.dump do?")[0].id == "user:notes.jsonl:4#0"
    assert ix.search("slicings")[0].id == "pydoc:topic:slicings#0"
    keys = dict(ix.name_keys("what does json.dumps do"))
    assert "=json dumps" in keys and "json dump" in keys  # the identifier as written, its words stemmed


def test_a_passage_that_covers_more_of_the_question_beats_one_rare_word(tmp_path):
    """Scores are BM25F times sqrt(share of the query's idf matched): a note repeating the one rare
    word of the question ("quokka") no longer beats the note that answers the rest of it, although
    plain BM25F ranks it first (the commoner words each occur in 30 other notes)."""
    notes = [{"title": "Marsupial notes", "text": "Quokka, quokka: the quokka quokka."},
             {"title": "Tidying", "text": "To remove a burrow with everything inside it, dig it out recursively."}]
    notes += [{"title": f"Filler {i}", "text": f"Note {i}: {w} it."}
              for i in range(30) for w in ("remove", "burrow", "recursively")]
    ix = pydoc_topics_and_notes_index(tmp_path, notes)
    query = "quokka: remove a burrow recursively"
    assert [p.id for p in ix.search(query, 2)] == ["user:notes.jsonl:2#0", "user:notes.jsonl:1#0"]
    docs, scores = ix.scores(query, coverage=False)
    bm25 = dict(zip([ix.passage(d).id for d in docs.tolist()], scores.tolist()))
    assert bm25["user:notes.jsonl:1#0"] > bm25["user:notes.jsonl:2#0"]  # plain BM25F: the quokka note


def test_query_words_and_stop_words():
    assert words("Naïve CAFÉ json.dumps() skip_keys") == ["naive", "cafe", "json", "dumps", "skip", "keys"]
    assert content_words("What is the for statement?") == ["statement"]
    assert content_words("for the") == ["for", "the"]  # only stop words: search them anyway
    assert content_words("a b a b c") == ["b", "c"]


def test_hostile_queries_never_raise(index_path):
    ix = Index(index_path)
    for q in NASTY + ["constructor", "toString __proto__", "hasOwnProperty"]:
        got = ix.search(q, k=3)
        assert isinstance(got, list) and len(got) <= 3
    assert ix.search("") == [] and ix.search("?!.,;") == [] and ix.search("*") == []
    assert ix.search('-frobnicate')[0].source == "docs"  # no query syntax: the minus is text


def test_source_filter(index_path):
    ix = Index(index_path)
    assert {p.source for p in ix.search("frobnicate widget statement", k=10, sources=("docs",))} == {"docs"}
    assert all(p.source == "pydoc-topics" for p in ix.search("frobnicate statement", k=10, sources=("pydoc-topics",)))
    assert all(p.source == "pydoc-topics" for p in ix.search("widget.frobnicate", sources=("pydoc-topics",)))
    assert ix.search("frobnicate", sources=()) == [] and ix.search("frobnicate", sources=("nope",)) == []
    assert ix.search("conversation", sources=("chitchat",)) == []  # not indexed by default


def test_passages_len_to_dict_and_threads(index_path):
    ix = Index(index_path)
    p = ix.search("quokka care", k=1)[0]
    assert p.title == "Quokka care" and p.source == "docs" and p.origin.endswith("notes.jsonl")
    assert ix.get(p.id) == Passage(p.id, p.title, p.source, p.origin, p.text)
    assert ix.get("user:notes.jsonl:2#99") is None and ix.get("") is None
    assert len(ix) == ix.meta["docs"] == len(all_passages(ix))
    d = p.to_dict()
    assert set(d) == {"id", "title", "source", "origin", "text", "score"}
    assert format_context([d]).startswith("[1] Quokka care\nQuokkas eat")
    errors = []

    def worker():
        try:
            for _ in range(20):
                assert Index.search(ix, "widget.frobnicate")[0].id == "user:notes.jsonl:1#0"
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_missing_old_or_corrupt_index_is_a_clear_error(tmp_path, index_path):
    with pytest.raises(FileNotFoundError, match=r"nope.*builder index build"):
        Index(tmp_path / "nope")
    old = tmp_path / "index.sqlite"
    old.write_bytes(b"SQLite format 3\x00" + b"x" * 100)
    with pytest.raises(ValueError, match=r"index\.sqlite is a file.*builder index build"):
        Index(old)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad.*builder index build"):
        Index(bad)
    (bad / "meta.json").write_text(json.dumps({"format": "supermix-bm25-v1"}))
    with pytest.raises(ValueError, match=r"format 'supermix-bm25-v1'"):
        Index(bad)
    before = {p: p.read_bytes() for p in index_path.rglob("*") if p.is_file()}
    Index(index_path).search("frobnicate")  # read-only: searching never writes
    assert {p: p.read_bytes() for p in index_path.rglob("*") if p.is_file()} == before


# ----------------------------------------------------------------------------- CLI

def test_cli_build_and_search(corpus, tmp_path):
    out = tmp_path / "cli-index"
    runner = CliRunner()
    r = runner.invoke(main, ["index", "build", "--data", str(corpus), "--out", str(out), "--quiet",
                             "--max-chars", "300"])
    assert r.exit_code == 0, r.output
    assert re.search(r"docs\s+\d+", r.stdout) and "total" in r.stdout and "chitchat" not in r.stdout
    r = runner.invoke(main, ["index", "search", "What does widget.frobnicate do?", "--index", str(out), "-k", "2"])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("[1] user:notes.jsonl:1#0") and "[2]" in r.stdout and "[3]" not in r.stdout
    r = runner.invoke(main, ["index", "search", "zzzqqq", "--index", str(out)])
    assert r.exit_code == 0 and "no passages" in r.stdout
    if any(r["source"] == "chitchat" for r in records(corpus).values()):  # when chitchat-dataset is installed
        r = runner.invoke(main, ["index", "build", "--data", str(corpus), "--out", str(tmp_path / "c"),
                                 "--sources", "chitchat", "--quiet"])
        assert r.exit_code == 0 and "chitchat" in r.stdout


def test_cli_user_errors(tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["index", "build", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "i")])
    assert r.exit_code == 1 and "builder data build" in r.output and "Traceback" not in r.output
    r = runner.invoke(main, ["index", "search", "x", "--index", str(tmp_path / "i")])
    assert r.exit_code == 1 and "builder index build" in r.output
    r = runner.invoke(main, ["index", "build", "--help"])
    assert r.exit_code == 0 and "Examples" in r.output and "builder index build" in r.output
    assert "search" in runner.invoke(main, ["index", "--help"]).output


def test_docstrings_are_found_by_the_manuals_wording(tmp_path):
    """The manual's entry for an API (its heading, signature and description) is filed under the
    docstring record, so a question worded like the manual finds the docstring; the text is unchanged."""
    from source.api_manual import manual_entries, manual_entry

    (tmp_path / "recipe.json").write_text(json.dumps({"name": "t", "sources": [
        {"name": "docstrings", "license": "PSF-2.0"}, {"name": "python-docs", "license": "PSF-2.0"}]}))
    manifest = build_corpus(tmp_path / "recipe.json", tmp_path / "corpus", val_fraction=0.0, progress=False)
    if any(s["status"] != "ok" for s in manifest["sources"]):
        pytest.fail("python3-doc is not installed: run `bash scripts/setup.sh --dev`")
    recs = records(tmp_path / "corpus")
    entries = manual_entries(recs.values())
    join = manual_entry("posixpath.join", entries)  # the docstring's home; the manual says os.path.join
    assert join.startswith("os.path — Common pathname manipulations\nos.path.join(path, *paths)\n")
    assert "segments intelligently" in join
    assert "Glob the given relative" in manual_entry("pathlib.Path.glob", entries)  # "Path.glob" on pathlib's page
    assert "in place" in manual_entry("builtins.list.reverse", entries)  # list.reverse() in the tutorial
    assert manual_entry("posixpath.no_such_function", entries) == ""

    meta = build_index(tmp_path / "corpus", tmp_path / "ix", progress=False)
    assert meta["manual_entries"] > 1000
    ix = Index(tmp_path / "ix")
    docstring = recs["docstring:posixpath.join"]["text"]
    assert "segments" not in docstring and "intelligently" not in docstring  # only the manual says so
    hits = ix.search("join path segments intelligently", 3)
    found = [p for p in hits if p.id == "docstring:posixpath.join#0"]
    assert found and docstring.startswith(found[0].text), [p.id for p in hits]  # shown text: the docstring's own


def test_docstrings_are_found_by_the_headings_of_manual_sections_that_mention_them(tmp_path):
    """A manual section's heading is filed under the docstring of every API its text mentions (by
    the name's last two parts, as the manual spells it), at half a text word's weight: a question in
    the heading's words finds the docstring, whose shown text does not change."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from source.api_manual import anchor_table, manual_anchors, mention_key

    rows = [("docstring:zz.gadget.frobnicate", "docstrings", "zz.gadget.frobnicate",
             "zz.gadget.frobnicate(level)\n\nFrobnicate the gadget at the given level.", ""),
            ("docstring:zz.gadget.defrost", "docstrings", "zz.gadget.defrost", "zz.gadget.defrost()\n\nDefrost it.", ""),
            ("python-docs:howto#polishing", "python-docs", "Polishing brass doorknobs",
             "Call `gadget.frobnicate(3)` once a week; see also zz.gadget for the rest.", "howto.rst.txt"),
            ("python-docs:howto#other", "python-docs", "Doorknob sizes", "Sizes vary.", "howto.rst.txt")]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.table({k: [r[i] for r in rows] for i, k in enumerate(("id", "source", "title", "text", "origin"))}
                            | {"license": ["PSF-2.0"] * len(rows)}), corpus / "train-00000.parquet")
    (corpus / "manifest.json").write_text("{}")
    records = [dict(zip(("id", "source", "title", "text", "origin"), r)) for r in rows]
    assert mention_key("posixpath.join") == "posixpath.join" and mention_key("json") == ""
    anchors = anchor_table(records)
    assert anchors["gadget.frobnicate"] == ["Polishing brass doorknobs"] and "zz.gadget" in anchors
    assert manual_anchors("zz.gadget.frobnicate", anchors) == ["Polishing brass doorknobs"]
    assert manual_anchors("zz.gadget.defrost", anchors) == []

    meta = build_index(corpus, tmp_path / "ix", progress=False)
    assert meta["anchored"] == 1
    ix = Index(tmp_path / "ix")
    hits = ix.search("polishing brass", 3)
    assert [p.id for p in hits] == ["python-docs:howto#polishing#0", "docstring:zz.gadget.frobnicate#0"]
    assert hits[1].text == rows[0][3]  # shown text: the docstring's own
    assert ix.postings("polish")[2].tolist() == [0.5, 5.0]  # half a word in the docstring; a title word of the section

