"""Retrieval quality: our `Index.search` vs plain BM25 on the same index, side by side.

    python benchmarks/retrieval.py [--index datasets/built/index] [--questions datasets/eval/natural.jsonl]
                                   [--test datasets/built/sft/test.jsonl] [--k 3]

Sets:
- `natural`: the answerable items of the hand-written natural questions (datasets/eval/README.md), the
  query built as the runtime builds it (`source.prompt.retrieval_query`: a follow-up carries the turn
  before it); an answering record is any of the item's `gold` ids. Also reported per kind and per
  half of the file: ranking changes are tuned on the items on even lines (1-based) and the odd lines
  are kept to check that a gain is not fitted to the items it was tuned on.
- `held-out`: the grounded questions of `builder sft-data`'s test split (template questions that name
  their entity), the gold record as the answer.
Rows:
- `bm25`: BM25F over the content words alone (`Index.scores(coverage=False)`), one passage per record,
  no coverage factor, no prior, no name bonus.
- `ours`: `Index.search`, what the runtime, `builder sft-data`, `builder eval` and the site call.
Columns: hit@1 and hit@k (an answering record first / among the top k), MRR@k, median ms per query,
and ours' hit@k over bm25's; then the same three figures per group of the natural set.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script from anywhere

from source.prompt import retrieval_query  # noqa: E402
from source.retrieval import Index  # noqa: E402


def plain_bm25(index: Index, query: str, k: int) -> list[str]:
    """Record ids of the top k by BM25F alone, one passage per record."""
    docs, scores = index.scores(query, coverage=False)
    out: list[str] = []
    for i in np.lexsort((docs, -scores))[:4 * k + 8]:
        rid = index.passage(int(docs[i])).id.rsplit("#", 1)[0]
        if rid not in out:
            out.append(rid)
    return out[:k]


def figures(ranks: list[int]) -> tuple[float, float, float]:
    """(hit@1, hit@k, MRR@k) of the rank of the first answering record of each item (0: none in the top k)."""
    n = max(1, len(ranks))
    return sum(r == 1 for r in ranks) / n, sum(r > 0 for r in ranks) / n, sum(1 / r for r in ranks if r) / n


def score(search, items: list[tuple[str, list[str], tuple[str, ...]]], k: int) -> dict:
    """Overall figures, median ms, and figures per group (an item's kind, its half of the file)."""
    times, ranks, groups = [], [], {}
    for query, answers, tags in items:
        t0 = time.perf_counter()
        got = search(query, k)
        times.append(time.perf_counter() - t0)
        rank = next((i for i, rid in enumerate(got, 1) if rid in answers), 0)
        ranks.append(rank)
        for tag in tags:
            groups.setdefault(tag, []).append(rank)
    hit1, hitk, mrr = figures(ranks)
    return {"hit@1": hit1, "hit@k": hitk, "mrr": mrr, "ms": 1000 * statistics.median(times or [0]),
            "groups": {tag: (len(r), *figures(r)) for tag, r in sorted(groups.items())}}


def natural(path: Path) -> list[tuple[str, list[str], tuple[str, ...]]]:
    """(query, gold ids, (kind, half)) of every answerable item; half is "even" or "odd" by 1-based line."""
    items = []
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        item = json.loads(line)
        if item["gold"]:
            query = retrieval_query([*item["history"], {"role": "user", "content": item["question"]}])
            items.append((query, item["gold"], (item["kind"], "odd" if no % 2 else "even")))
    return items


def held_out(path: Path) -> list[tuple[str, list[str], str]]:
    items = []
    for line in path.read_text(encoding="utf-8").splitlines():
        ex = json.loads(line)
        meta = ex.get("meta", {})
        if meta.get("kind") == "grounded" and meta.get("gold"):
            items.append((ex["messages"][-2]["content"], [meta["gold"].rsplit("#", 1)[0]], ()))
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", type=Path, default=Path("datasets/built/index"))
    ap.add_argument("--questions", type=Path, default=Path("datasets/eval/natural.jsonl"))
    ap.add_argument("--test", type=Path, default=Path("datasets/built/sft/test.jsonl"))
    ap.add_argument("--k", type=int, default=3)
    args = ap.parse_args()
    try:
        index = Index(args.index)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(str(e))
    known = {index.passage(d).id.rsplit("#", 1)[0] for d in np.flatnonzero(index.chunks == 0).tolist()}
    sets = {"natural": natural(args.questions)}
    for query, answers, _ in sets["natural"]:
        if not set(answers) & known:  # a rebuilt corpus must not silently shrink the set
            sys.exit(f"{args.questions}: no gold record of {query!r} is in {args.index}: {answers}")
    if args.test.is_file():
        sets["held-out"] = held_out(args.test)
    rows = {"bm25": lambda q, k: plain_bm25(index, q, k),
            "ours": lambda q, k: [p.id.rsplit("#", 1)[0] for p in index.search(q, k)]}
    print(f"index {args.index} ({len(index)} passages), k={args.k}")
    print(f"{'set':<9} {'n':>5}  {'search':<6} {'hit@1':>6} {'hit@k':>6} {'MRR':>6} {'ms':>6}  vs bm25")
    groups = []
    for name, items in sets.items():
        base = None
        for row, search in rows.items():
            s = score(search, items, args.k)
            base = base if base is not None else s["hit@k"]
            ratio = f"{s['hit@k'] / base:.2f}x" if base else "-"
            print(f"{name:<9} {len(items):>5}  {row:<6} {s['hit@1']:>6.3f} {s['hit@k']:>6.3f} {s['mrr']:>6.3f} "
                  f"{s['ms']:>6.1f}  {ratio:>7}")
            groups += [(name, tag, row, g) for tag, g in s["groups"].items()]
    print(f"\n{'set':<9} {'group':<9} {'n':>5}  {'search':<6} {'hit@1':>6} {'hit@k':>6} {'MRR':>6}")
    for name, tag, row, (n, hit1, hitk, mrr) in sorted(groups, key=lambda g: (g[0], g[1] not in ("even", "odd"), g[1])):
        print(f"{name:<9} {tag:<9} {n:>5}  {row:<6} {hit1:>6.3f} {hitk:>6.3f} {mrr:>6.3f}")


if __name__ == "__main__":
    main()
