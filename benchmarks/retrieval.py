"""Retrieval quality: our `Index.search` vs plain FTS5 BM25 on the same SQLite index, side by side.

    python benchmarks/retrieval.py [--index datasets/built/index] [--test datasets/built/sft/test.jsonl]
                                   [--browser dist/export/index] [--k 3]

Two question sets:
- `natural`: QUESTIONS below, written by hand the way people ask ("How does the for statement work in
  Python?"), each with the records that answer it (any one counts). Every labelled id must exist in the
  index, or the script stops naming the question: a rebuilt corpus must not silently shrink the set.
- `held-out`: the grounded questions of `builder sft-data`'s test split, the gold record as the answer.
  They come from templates that name the entity ("Tell me about decimal.Context.logical_xor."), so this
  set shows the exact-title path; `natural` shows everything else.
Rows:
- `fts5-bm25`: the query's non-stop words OR-ed (`fts_query`), `bm25(fts, 5, 1)`, one passage per record:
  what our search does without its exact-title and keyword lookups.
- `ours`: `source.retrieval.Index.search`, what the runtime and `builder sft-data` call.
- `browser`: `builder.browser_index.BrowserIndex` over an exported browser index (`--browser`, default
  dist/export/index when it exists): the Python reference of the site's JavaScript search.
Columns: hit@1 and hit@k (an answering record first / among the top k), MRR@k, and the ratio of
hit@k to fts5-bm25's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sqlite3
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script from anywhere

from source.retrieval import TEXT_WEIGHT, TITLE_WEIGHT, Index, fts_query  # noqa: E402

QUESTIONS: list[tuple[str, list[str]]] = [
    ("What does json.dumps do?", ["docstring:json.dumps"]),
    ("What does os.path.join do?", ["docstring:posixpath.join"]),
    ("What does re.compile do?", ["docstring:re.compile"]),
    ("What does datetime.datetime.now return?", ["docstring:datetime.datetime.now"]),
    ("How do I sort a list?", ["docstring:builtins.sorted", "python-docs:howto/sorting.rst.txt#sorting-basics",
                               "python-docs:howto/sorting.rst.txt#sorting-how-to"]),
    ("What is a list comprehension?", ["python-docs:tutorial/datastructures.rst.txt#list-comprehensions",
                                       "foldoc:list comprehension"]),
    ("How does the for statement work in Python?", ["pydoc:topic:for",
                                                    "python-docs:tutorial/controlflow.rst.txt#for-statements"]),
    ("How do I write a while loop?", ["pydoc:topic:while"]),
    ("What does the with statement do?", ["pydoc:topic:with",
                                          "python-docs:reference/compound_stmts.rst.txt#the-with-statement"]),
    ("What is a lambda expression?", ["pydoc:topic:lambda", "foldoc:lambda expression",
                                      "python-docs:reference/expressions.rst.txt#lambdas"]),
    ("How do I handle exceptions in Python?", ["python-docs:tutorial/errors.rst.txt#handling-exceptions",
                                               "pydoc:topic:try"]),
    ("What does the return statement do?", ["pydoc:topic:return"]),
    ("What does the yield keyword do?", ["pydoc:topic:yield"]),
    ("What does the break statement do?", ["pydoc:topic:break"]),
    ("What is the in operator?", ["pydoc:topic:in"]),
    ("How do I import a module?", ["pydoc:topic:import"]),
    ("How do I define a function?", ["python-docs:tutorial/controlflow.rst.txt#defining-functions",
                                     "pydoc:topic:function"]),
    ("What is slicing in Python?", ["pydoc:topic:slicings"]),
    ("How do I create a virtual environment?", [
        "python-docs:tutorial/venv.rst.txt#creating-virtual-environments",
        "python-docs:library/venv.rst.txt#venv-creation-of-virtual-environments"]),
    ("What are formatted string literals?", [
        "python-docs:reference/lexical_analysis.rst.txt#formatted-string-literals",
        "python-docs:tutorial/inputoutput.rst.txt#formatted-string-literals"]),
    ("What are regular expressions?", ["python-docs:howto/regex.rst.txt#regular-expression-howto",
                                       "python-docs:library/re.rst.txt#re-regular-expression-operations",
                                       "foldoc:regular expression"]),
    ("What is the Global Interpreter Lock?", [
        "python-docs:faq/library.rst.txt#can-t-we-get-rid-of-the-global-interpreter-lock",
        "python-docs:c-api/init.rst.txt#thread-state-and-the-global-interpreter-lock"]),
    ("What is recursion?", ["foldoc:recursion", "wordnet:noun:05848357"]),
    ("What is a closure in programming?", ["foldoc:closure"]),
    ("What is garbage collection?", ["foldoc:garbage collection", "wordnet:noun:01015843"]),
    ("What is a compiler?", ["foldoc:compiler", "wordnet:noun:06573600"]),
    ("What is a kernel in an operating system?", ["foldoc:kernel"]),
    ("Define ephemeral.", ["wordnet:adj:01756293"]),
    ("What does serendipity mean?", ["wordnet:noun:11463895"]),
]


def plain_bm25(con: sqlite3.Connection, query: str, k: int) -> list[str]:
    """Record ids of the top k by FTS5 BM25 alone, one passage per record."""
    match = fts_query(query)
    if not match:
        return []
    rows = con.execute(f"SELECT p.id FROM fts JOIN passages p ON p.rowid = fts.rowid WHERE fts MATCH ? "
                       f"ORDER BY bm25(fts, {TITLE_WEIGHT}, {TEXT_WEIGHT}) LIMIT ?", [match, 4 * k + 8]).fetchall()
    return list(dict.fromkeys(r[0].rsplit("#", 1)[0] for r in rows))[:k]


def score(search, items: list[tuple[str, list[str]]], k: int) -> dict:
    hit1 = hitk = rr = 0.0
    times = []
    for question, answers in items:
        t0 = time.perf_counter()
        got = search(question, k)
        times.append(time.perf_counter() - t0)
        ranks = [i for i, rid in enumerate(got, 1) if rid in answers]
        hit1 += bool(ranks) and ranks[0] == 1
        hitk += bool(ranks)
        rr += 1 / ranks[0] if ranks else 0.0
    n = max(1, len(items))
    return {"hit@1": hit1 / n, "hit@k": hitk / n, "mrr": rr / n, "ms": 1000 * statistics.median(times or [0])}


def held_out(path: Path) -> list[tuple[str, list[str]]]:
    items = []
    for line in path.read_text(encoding="utf-8").splitlines():
        ex = json.loads(line)
        meta = ex.get("meta", {})
        if meta.get("kind") == "grounded" and meta.get("gold"):
            items.append((ex["messages"][-2]["content"], [meta["gold"].rsplit("#", 1)[0]]))
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", type=Path, default=Path("datasets/built/index"))
    ap.add_argument("--test", type=Path, default=Path("datasets/built/sft/test.jsonl"))
    ap.add_argument("--browser", type=Path, default=Path("dist/export/index"))
    ap.add_argument("--k", type=int, default=3)
    args = ap.parse_args()
    if not args.index.is_file():
        sys.exit(f"{args.index}: no retrieval index; build one with `builder index build`")
    con = sqlite3.connect(f"{args.index.resolve().as_uri()}?mode=ro", uri=True)
    known = {r[0].rsplit("#", 1)[0] for r in con.execute("SELECT id FROM passages WHERE chunk = 0")}
    for question, answers in QUESTIONS:
        if missing := [a for a in answers if a not in known]:
            sys.exit(f"benchmarks/retrieval.py QUESTIONS: {question!r} names {missing}, not in {args.index}")
    index = Index(args.index)
    rows = {"fts5-bm25": lambda q, k: plain_bm25(con, q, k),
            "ours": lambda q, k: [p.id.rsplit("#", 1)[0] for p in index.search(q, k)]}
    if (args.browser / "meta.json").is_file():
        from builder.browser_index import BrowserIndex

        browser = BrowserIndex(args.browser)
        rows["browser"] = lambda q, k: [p.id.rsplit("#", 1)[0] for p in browser.search(q, k)]
    sets = {"natural": QUESTIONS}
    if args.test.is_file():
        sets["held-out"] = held_out(args.test)
    print(f"index {args.index} ({len(index)} passages), k={args.k}")
    print(f"{'set':<9} {'n':>5}  {'search':<10} {'hit@1':>6} {'hit@k':>6} {'MRR':>6} {'ms':>6}  hit@k vs fts5-bm25")
    for name, items in sets.items():
        base = None
        for row, search in rows.items():
            s = score(search, items, args.k)
            base = base if base is not None else s["hit@k"]
            ratio = f"{s['hit@k'] / base:.2f}x" if base else "-"
            print(f"{name:<9} {len(items):>5}  {row:<10} {s['hit@1']:>6.3f} {s['hit@k']:>6.3f} {s['mrr']:>6.3f} "
                  f"{s['ms']:>6.1f}  {ratio}")


if __name__ == "__main__":
    main()
