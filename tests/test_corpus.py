"""Corpus stage: real sources, real files, real Parquet. Each build is capped with limit_per_source."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from builder.cli import main
from source.corpus import CorpusError, clean, dedup, foldoc, pii, python_docs, wordnet
from source.corpus.build import COLUMNS, build_corpus, iter_records, iter_texts, load_recipe

ALL_SOURCES = [("pydoc-topics", "PSF-2.0"), ("docstrings", "PSF-2.0"), ("python-docs", "PSF-2.0"),
               ("wordnet", "WordNet-3.0"), ("foldoc", "GFDL-1.1-or-later"), ("chitchat", "MIT")]
ID_PREFIX = {"pydoc-topics": "pydoc:topic:", "docstrings": "docstring:", "python-docs": "python-docs:",
             "wordnet": "wordnet:", "foldoc": "foldoc:", "chitchat": "chitchat:", "user": "user:"}

# Long enough (>= 40 words) to enter the near-duplicate pass.
LONG = ("The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden "
        "porch and wonders whether the rain will come before the harvest is finished this year, "
        "because the barley is ripe, the wheat is nearly ready, and the forecast for the coming "
        "week keeps changing every single morning without any warning at all.")
OTHER = ("Sorting algorithms arrange the elements of a list in a chosen order; merge sort divides "
         "the list into halves, sorts each half recursively and merges the two sorted halves, which "
         "gives a running time proportional to n log n in every case, while quicksort picks a pivot "
         "and partitions the remaining elements around it before recursing on both sides.")

THIRD = ("A lighthouse keeper on a small island kept a careful log of every ship that passed, noting "
         "the weather, the direction of the wind, the colour of the sails and the time of day, and "
         "after forty years the log filled eleven volumes that now sit in the harbour museum.")


def write_recipe(path: Path, sources: list[dict]) -> Path:
    path.write_text(json.dumps({"name": "test", "sources": sources}, indent=2))
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def user_build(tmp_path: Path, files: dict[str, str | bytes], **kw) -> dict:
    """Build pydoc topics (5 records) + a folder of user files; return the manifest."""
    folder = tmp_path / "mine"
    folder.mkdir(exist_ok=True)
    for name, content in files.items():
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    recipe = write_recipe(tmp_path / "r.json", [{"name": "pydoc-topics", "license": "PSF-2.0"}])
    kw.setdefault("limit_per_source", 5)
    return build_corpus(recipe, tmp_path / "out", extra_paths=[folder], progress=False, **kw)


# ----------------------------------------------------------------------------- end to end

def test_cli_builds_all_installed_sources(tmp_path):
    recipe = write_recipe(tmp_path / "r.json", [{"name": n, "weight": 1.0, "license": l} for n, l in ALL_SOURCES])
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["data", "build", "--recipe", str(recipe), "--out", str(out),
                                       "--limit-per-source", "30", "--val-fraction", "0.1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "pydoc-topics" in result.stdout and "total" in result.stdout  # the summary table

    manifest = json.loads((out / "manifest.json").read_text())
    by_name = {s["name"]: s for s in manifest["sources"]}
    assert set(by_name) == {n for n, _ in ALL_SOURCES}
    assert by_name["docstrings"]["status"] == by_name["pydoc-topics"]["status"] == "ok"
    rows = list(iter_records(out, "train")) + list(iter_records(out, "val"))
    got = Counter(r["source"] for r in rows)
    for name, lic in ALL_SOURCES:
        s = by_name[name]
        if s["status"] == "skipped":  # optional package not installed here
            assert s["reason"]
            continue
        assert s["license"] == lic and s["version"] and s["path"]
        counts = s["records"]
        assert counts["raw"] == 30 and counts["raw"] >= counts["after_clean"] >= counts["after_exact_dedup"] \
            >= counts["after_near_dedup"] >= counts["after_pii"] > 0
        assert got[name] == counts["after_pii"]
    assert all(r["id"].startswith(ID_PREFIX[r["source"]]) for r in rows)
    assert all(r["text"] and r["title"] and r["license"] and r["origin"] for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    if by_name["wordnet"]["status"] == "ok":
        w = next(r for r in rows if r["source"] == "wordnet")
        assert w["text"].startswith(f"{w['title']} (") and "): " in w["text"]
    d = next(r for r in rows if r["source"] == "docstrings")
    assert d["title"] == d["id"].removeprefix("docstring:") and "\n\n" in d["text"]


def test_parquet_schema_manifest_and_readers(tmp_path):
    manifest = user_build(tmp_path, {"a.txt": "Some text of my own."}, val_fraction=0.2)
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert files == ["manifest.json", "train-00000.parquet", "val-00000.parquet"]
    for f in ("train-00000.parquet", "val-00000.parquet"):
        schema = pq.read_schema(out / f)
        assert schema.names == COLUMNS
        assert all(schema.field(c).type == pa.string() and not schema.field(c).nullable for c in COLUMNS)
    for o in manifest["outputs"]:
        assert o["sha256"] == sha(out / o["file"])
        assert o["rows"] == pq.ParquetFile(out / o["file"]).metadata.num_rows
    assert manifest["recipe_sha256"] == sha(tmp_path / "r.json")
    assert set(manifest) >= {"recipe", "recipe_sha256", "created", "sources", "pii_replacements", "outputs", "totals"}
    user = manifest["sources"][-1]
    assert user["name"] == "user" and user["status"] == "ok" and len(user["sha256"]) == 64
    n_pydoc = manifest["sources"][0]["records"]["after_pii"]
    assert manifest["totals"]["train_rows"] + manifest["totals"]["val_rows"] == manifest["totals"]["records"] == n_pydoc + 1
    assert [r["text"] for r in iter_records(out, "train")] == list(iter_texts(out, "train"))
    with pytest.raises(ValueError):
        next(iter_texts(out, "test"))


def test_rebuild_is_byte_identical(tmp_path):
    recipe = write_recipe(tmp_path / "r.json", [{"name": "docstrings", "license": "PSF-2.0"},
                                                {"name": "pydoc-topics", "license": "PSF-2.0"}])
    a = build_corpus(recipe, tmp_path / "a", limit_per_source=40, progress=False)
    b = build_corpus(recipe, tmp_path / "b", limit_per_source=40, progress=False)
    assert a["outputs"] == b["outputs"]
    assert [s["sha256"] for s in a["sources"]] == [s["sha256"] for s in b["sources"]]
    for o in a["outputs"]:
        assert (tmp_path / "a" / o["file"]).read_bytes() == (tmp_path / "b" / o["file"]).read_bytes()
    # Rebuilding in place replaces files atomically and leaves no temp files behind.
    c = build_corpus(recipe, tmp_path / "a", limit_per_source=40, progress=False)
    assert c["outputs"] == a["outputs"]
    assert not list((tmp_path / "a").glob(".*"))


def test_split_is_deterministic_and_disjoint(tmp_path):
    recipe = write_recipe(tmp_path / "r.json", [{"name": "pydoc-topics", "license": "PSF-2.0"}])

    def split_ids(out: str, seed: int) -> tuple[list[str], list[str]]:
        build_corpus(recipe, tmp_path / out, val_fraction=0.2, seed=seed, progress=False)
        return [r["id"] for r in iter_records(tmp_path / out, "train")], [r["id"] for r in iter_records(tmp_path / out, "val")]

    train, val = split_ids("s0", 0)
    assert (train, val) == split_ids("s0-again", 0)
    n = json.loads((tmp_path / "s0" / "manifest.json").read_text())["totals"]["records"]
    assert not set(train) & set(val) and len(train) + len(val) == n > 70
    assert 5 <= len(val) <= 30
    train1, val1 = split_ids("s1", 1)
    assert set(val1) != set(val) and set(train1) | set(val1) == set(train) | set(val)


def test_weight_repeats_train_records(tmp_path):
    recipe = write_recipe(tmp_path / "r.json", [{"name": "pydoc-topics", "weight": 2.0, "license": "PSF-2.0"},
                                                {"name": "docstrings", "weight": 0, "license": "PSF-2.0"}])
    m = build_corpus(recipe, tmp_path / "out", limit_per_source=10, val_fraction=0, progress=False)
    assert m["totals"]["train_rows"] == 2 * m["totals"]["records"] and m["totals"]["val_rows"] == 0
    assert m["sources"][1]["status"] == "skipped"
    assert Counter(iter_texts(tmp_path / "out", "train")).most_common(1)[0][1] == 2


# ----------------------------------------------------------------------------- user files and errors

def test_user_files_all_formats(tmp_path):
    pq.write_table(pa.table({"text": ["A row from Parquet.", None], "title": ["Row", None]}),
                   tmp_path / "t.parquet")
    files = {
        "notes.md": "# My notes\n\nFirst paragraph.\n\nSecond paragraph.",
        "deep.rst": "Title\n=====\n\nBody text.",
        "chat.jsonl": json.dumps({"text": "plain line"}) + "\n\n" + json.dumps(
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]}) + "\n",
        "ignored.csv": "not,read",
        "t.parquet": (tmp_path / "t.parquet").read_bytes(),
    }
    user_build(tmp_path, files)
    rows = {r["id"]: r for r in iter_records(tmp_path / "out", "train")}
    rows.update({r["id"]: r for r in iter_records(tmp_path / "out", "val")})
    user = {k: v for k, v in rows.items() if v["source"] == "user"}
    assert set(user) == {"user:notes.md:0", "user:deep.rst:0", "user:chat.jsonl:1", "user:chat.jsonl:3",
                         "user:t.parquet:0"}
    assert user["user:chat.jsonl:3"]["text"] == "User: hi\nAssistant: hello!"
    assert user["user:t.parquet:0"]["title"] == "Row"
    assert user["user:notes.md:0"]["license"] == "user-supplied"


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    files = {"good.txt": "fine", "bad.jsonl": '{"text": "ok"}\n{"text": "unterminated\n'}
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: invalid JSON"):
        user_build(tmp_path, files)
    result = CliRunner().invoke(main, ["data", "build", "--recipe", str(tmp_path / "r.json"), "--out",
                                       str(tmp_path / "cli"), "--add", str(tmp_path / "mine"), "--quiet"])
    assert result.exit_code == 1 and "bad.jsonl:2" in result.output and "Traceback" not in result.output
    (tmp_path / "w").mkdir()
    with pytest.raises(CorpusError, match=r"wrong\.jsonl:1: needs a string \"text\""):
        user_build(tmp_path / "w", {"wrong.jsonl": '{"body": 1}\n'})


def test_jsonl_user_file_with_bad_bytes_names_file_line_and_byte(tmp_path):
    """Invalid UTF-8, lone surrogate escapes and absurd nesting in a .jsonl given to `data build --add`."""
    lines = [b'{"text": "fine"}\n', b'{"text": "also fine"}\n', b'{"text": "caf\xe9"}\n']
    (tmp_path / "a").mkdir()
    with pytest.raises(CorpusError, match=r"latin1\.jsonl:3: not valid UTF-8 \(byte 52 of the file"):
        user_build(tmp_path / "a", {"latin1.jsonl": b"".join(lines)})
    result = CliRunner().invoke(main, ["data", "build", "--recipe", str(tmp_path / "a" / "r.json"), "--out",
                                       str(tmp_path / "cli"), "--add", str(tmp_path / "a" / "mine"), "--quiet"])
    assert result.exit_code == 1 and "latin1.jsonl:3: not valid UTF-8" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "cli").exists()
    for name, line, message in [("surrogate.jsonl", '{"text": "\\ud800"}', "unpaired surrogate"),
                                ("deep.jsonl", "[" * 100_000, "nested too deeply")]:
        (tmp_path / name).mkdir()
        with pytest.raises(CorpusError, match=re.escape(f"{name}:2: ") + ".*" + message):
            user_build(tmp_path / name, {name: '{"text": "ok"}\n' + line + "\n"})


def test_unreadable_and_empty_inputs_are_clear_errors(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(CorpusError, match=r"latin1\.txt:2: not valid UTF-8"):
        user_build(tmp_path / "a", {"latin1.txt": b"line one\ncaf\xe9\n"})
    (tmp_path / "b").mkdir()
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "b.parquet")
    with pytest.raises(CorpusError, match=r"no 'text' column"):
        user_build(tmp_path / "b", {"t.parquet": (tmp_path / "b.parquet").read_bytes()})
    empty = tmp_path / "empty"
    empty.mkdir()
    recipe = write_recipe(tmp_path / "r.json", [{"name": "mine", "reader": "user", "path": "empty"}])
    with pytest.raises(CorpusError, match="corpus is empty"):
        build_corpus(recipe, tmp_path / "out", progress=False)
    with pytest.raises(CorpusError, match="no such file"):
        build_corpus(recipe, tmp_path / "out", extra_paths=[tmp_path / "nope"], progress=False)
    (tmp_path / "broken.json").write_text('{"sources": [\n  {"name": "wordnet",}\n]}')
    with pytest.raises(CorpusError, match=r"broken\.json:2:\d+: invalid JSON"):
        load_recipe(tmp_path / "broken.json")
    write_recipe(tmp_path / "typo.json", [{"name": "pydoc-topics"}, {"name": "wordnt"}])
    with pytest.raises(CorpusError, match=r"typo\.json:8: unknown source 'wordnt'"):
        load_recipe(tmp_path / "typo.json")


def test_missing_source_path_is_skipped_with_install_hint(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.json", [
        {"name": "pydoc-topics", "license": "PSF-2.0"},
        {"name": "wordnet", "license": "WordNet-3.0", "path": str(tmp_path / "no-wordnet")},
        {"name": "foldoc", "license": "GFDL-1.1-or-later", "path": str(tmp_path / "no-dictd")},
    ])
    m = build_corpus(recipe, tmp_path / "out", limit_per_source=5, progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"skipped wordnet: {tmp_path / 'no-wordnet'} not found (install: apt-get install wordnet-base)",
                   f"skipped foldoc: foldoc.index, foldoc.dict.dz not found in {tmp_path / 'no-dictd'} "
                   "(install: apt-get install dict-foldoc)"]
    status = {s["name"]: (s["status"], s.get("reason", "")) for s in m["sources"]}
    assert status["pydoc-topics"] == ("ok", "") and status["wordnet"][0] == status["foldoc"][0] == "skipped"
    assert m["totals"]["records"] == 5


# ----------------------------------------------------------------------------- pipeline steps

def test_exact_and_near_duplicates_are_removed(tmp_path):
    base = LONG + " " + OTHER
    near = base.replace("barley", "oats")  # one word: ~5 of ~115 shingles change, Jaccard ~0.92
    lines = [base, "  " + base.upper().replace(" ", "   ") + " ", near, THIRD, "short one", "Short  one"]
    m = user_build(tmp_path, {"d.jsonl": "\n".join(json.dumps({"text": t}) for t in lines)},
                   val_fraction=0, limit_per_source=10)
    counts = m["sources"][-1]["records"]
    assert counts == {"raw": 6, "after_clean": 6, "after_exact_dedup": 4, "after_near_dedup": 3, "after_pii": 3}
    texts = set(iter_texts(tmp_path / "out", "train"))
    assert base in texts and THIRD in texts and near not in texts and "short one" in texts
    # The near pass leaves short records alone even when they share most words.
    short = [{"text": "a b c d e f g h"}, {"text": "a b c d e f g i"}]
    assert len(dedup.near_dedup(short)) == 2
    assert len(dedup.near_dedup([{"text": LONG}, {"text": OTHER}])) == 2


def test_pii_is_scrubbed_and_counted(tmp_path):
    text = ("Mail jane.doe@gmail.com or call 555-867-5309 / +44 20 7946 0958. Server 93.184.216.34, "
            "key sk-abcdefghijklmnopqrstuvwxyz123456 ghp_ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghij "
            "AKIAIOSFODNN7EXAMPLE and api_key = 'Zx81KqPz0aLm3NvB7'. "
            "Keep user@example.com, 127.0.0.1, 192.168.0.1 and sha1 da39a3ee5e6b4b0d3255bfef95601890afd80709.")
    counts = Counter()
    out = pii.scrub(text, counts)
    for secret in ("jane.doe", "867-5309", "7946", "93.184", "sk-abc", "ghp_", "AKIA", "Zx81"):
        assert secret not in out
    for kept in ("user@example.com", "127.0.0.1", "192.168.0.1", "da39a3ee5e6b4b0d3255bfef95601890afd80709"):
        assert kept in out
    assert dict(counts) == {"email": 1, "phone": 2, "ipv4": 1, "api_key": 3, "secret": 1}
    assert "<EMAIL>" in out and "<PHONE>" in out and "<IP>" in out and "<KEY>" in out and "<SECRET>" in out
    m = user_build(tmp_path, {"p.txt": text}, val_fraction=0)
    assert m["pii_replacements"]["email"] >= 1 and m["pii_replacements"]["api_key"] == 3
    assert any("<KEY>" in t for t in iter_texts(tmp_path / "out", "train"))


def test_clean_normalises_unicode_and_whitespace():
    raw = "\ufeffcafe\u0301\x00 \u00a0ok  \r\n\r\n\r\n\r\nnext\t \n    indented\x07"
    assert clean.clean_text(raw) == "café  ok\n\nnext\n    indented"
    assert unicodedata.is_normalized("NFC", clean.clean_text(raw))
    assert clean.clean_records([{"text": " \x00 \n", "title": "x"}]) == []


# ----------------------------------------------------------------------------- readers on crafted input

def test_wordnet_line_parser():
    line = ('01756293 00 s 02 ephemeral 0 short-lived(a) 0 003 & 01754421 a 0000 | lasting a very '
            'short time; "the ephemeral joys of childhood"; "a passing fancy"  \n')
    offset, words, definition, examples = wordnet.parse_line(line)
    assert (offset, words, definition) == ("01756293", ["ephemeral", "short-lived"], "lasting a very short time")
    assert wordnet.synset_text(words, "adj", definition, examples) == (
        'ephemeral (adjective): lasting a very short time. Also: short-lived. '
        'Examples: "the ephemeral joys of childhood"; "a passing fancy".')


def test_foldoc_body_and_base64_offsets():
    assert foldoc.b64("A") == 0 and foldoc.b64("BA") == 64 and foldoc.b64("Gb9L") == 6 * 64**3 + 27 * 64**2 + 61 * 64 + 11
    body = ("closure\nupward closure\n\n   <programming> A {closure} holds an\n   expression.\n\n"
            "       code  stays\n\n   (1994-12-16)\n\n")
    assert foldoc.tidy_body(body) == ("closure", ["upward closure"],
                                      "<programming> A closure holds an expression.\n\n    code  stays")


def test_python_docs_sections():
    rst = """.. _json:

:mod:`json` --- JSON encoder
============================

.. module:: json
   :synopsis: Encode JSON.

Use :func:`dumps` to encode, see :ref:`the table <tbl>` and `JSON <https://json.org>`_.

Basic Usage
-----------

.. function:: dumps(obj, *, \\
                    indent=None)

   Serialize *obj* to a ``str``.

   .. versionadded:: 3.2
      The *indent* argument.

.. index:: single: nothing

Empty
-----
"""
    secs = list(python_docs.file_sections(rst, "library/json.rst.txt", "/x"))
    assert [s["id"] for s in secs] == ["python-docs:library/json.rst.txt#json-json-encoder",
                                       "python-docs:library/json.rst.txt#basic-usage"]
    assert secs[0]["title"] == "json — JSON encoder"
    assert "Use `dumps()` to encode, see the table and JSON." in secs[0]["text"]
    assert secs[1]["text"].startswith("Basic Usage (json — JSON encoder)\n\njson.dumps(obj, *, indent=None)")
    assert "Serialize *obj* to a `str`." in secs[1]["text"]
    assert "New in version 3.2." in secs[1]["text"] and "index::" not in secs[1]["text"]


def test_help_teaches_with_an_example():
    result = CliRunner().invoke(main, ["data", "build", "--help"])
    assert result.exit_code == 0 and "builder data build --add" in result.output


def test_docstrings_do_not_depend_on_the_machine_or_leak_its_environment(monkeypatch, tmp_path):
    """Signature defaults such as cgi.parse(environ=os.environ) once copied the build machine's environment
    variables into the corpus, and a virtualenv's setuptools replaced the stdlib's distutils."""
    import sys

    from source.corpus import docstrings

    monkeypatch.setenv("SUPERMIX_CANARY_TOKEN", "canary-8f2e61")
    recs = list(docstrings.records())
    text = "\n".join(r["text"] for r in recs)
    assert "canary-8f2e61" not in text and "environ({" not in text
    assert sys.executable not in text and sys.prefix not in text
    by_id = {r["id"]: r["text"] for r in recs}
    assert by_id["docstring:platform.architecture"].startswith("platform.architecture(executable=sys.executable,")
    assert "docstring:distutils.bcppcompiler" in by_id  # the stdlib's own distutils, not setuptools' copy
    assert list(docstrings.records()) == recs  # and the same on every run


def test_origins_of_installed_sources_do_not_name_the_machines_folders():
    """Records say where they came from as imported (pydoc_data/topics.py), not under which interpreter
    or virtualenv folder, or a clean clone's corpus differs from the committed one."""
    import sys

    from source.corpus import chitchat, pydoc_topics

    origins = {r["origin"] for r in pydoc_topics.records(limit=3)}
    if chitchat.missing(None) is None:
        origins |= {r["origin"] for r in chitchat.records(limit=3)}
    assert origins and not any(sys.prefix in o or sys.base_prefix in o or o.startswith("/") for o in origins), origins
