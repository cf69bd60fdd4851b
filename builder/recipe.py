"""A champion's whole recipe as a file (models/recipes/*.json), and `builder release --retrain`, which replays it.

A recipe names the corpus recipe and the committed corpus manifest, the tokenizer's, index's and chat data's
settings, then a list of training pieces, each trained from the one before:

    {"name": "sft-v9", "stage": "sft", "base": "sft-v8", "preset": "small", "data": "sft-data", "steps": 1374,
     "set": {"lr": 0.0003, "warmup_steps": 30, "seed": 9191}, "options": {"samples": 0}}

Design choices:
- a piece is data, not code: it becomes `builder STAGE --out RUNS/NAME --tokenizer T [--base RUNS/BASE/model.pth]
  [--preset P] [--data D] [--OPTION VALUE ...] --set max_steps=STEPS [--set K=V ...] [--resume]`, whatever
  the stage (pretrain, sft, dpo). Appending a piece is appending an object; no stage has its own code path
- resumable piece by piece: a piece whose model.pth reached its steps is skipped, one with a train_state.pt
  is resumed with --resume, others start; each says which and why. A finished or resumed run whose
  settings, base or tokenizer differ from the recipe is an error, not silently reused
- `--max-minutes` stops between pieces (exit status 3; the same command continues). A single piece longer
  than that is stopped by Ctrl-C or `timeout` like any training run: it resumes from its last checkpoint
- recorded inputs (corpus manifest, tokenizer, chat data stats, a piece's data) are compared with what the
  replay built; a difference is reported, not fatal: the replay is then a retraining, not a bit-for-bit copy
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from builder.release import CORPUS_MANIFEST, DATA, INDEX, STAGES, Release, Stage
from source.files import sha256_file

FORMAT = "supermix-recipe-v1"
RECIPES = {"default": "models/recipes/champion.json", "quick": "models/recipes/quick.json"}  # by release profile
TRAINING = ("pretrain", "sft", "dpo")  # builder verbs a piece may run
PAUSED_EXIT = 3


class RecipeError(click.ClickException):
    """A recipe file problem; the message names the file and the field."""


class Paused(Exception):
    """--max-minutes ran out between pieces; the message says where and how to continue."""


@dataclass
class Piece:
    name: str  # its run folder under the profile's runs/
    stage: str
    steps: int
    base: str | None = None  # an earlier piece's name
    preset: str | None = None
    data: str | None = None  # "corpus" or "sft-data": passed as --data
    set: dict = field(default_factory=dict)  # --set K=V (TrainConfig fields)
    options: dict = field(default_factory=dict)  # other options of the verb: {"samples": 0, "mine": 2000}
    inputs: dict = field(default_factory=dict)  # {"data_sha256": ...} as recorded when it was first trained
    recorded: dict = field(default_factory=dict)  # what history says about it (version, seconds): not replayed


@dataclass
class Recipe:
    path: Path
    name: str
    data: dict  # {"recipe", "manifest_sha256"}
    tokenizer: dict  # {"vocab_size", "max_chars", "seed", "sha256"}
    index: dict  # {"max_chars"}
    sft_data: dict  # {"seed", "limit", "max_tokens", "stats_sha256"}
    pieces: list[Piece]
    notes: list[str] = field(default_factory=list)

    def chain(self, name: str) -> list[Piece]:
        """The pieces behind `name`, oldest first."""
        by_name, out = {p.name: p for p in self.pieces}, []
        while name:
            out.append(by_name[name])
            name = by_name[name].base
        return out[::-1]


# ----------------------------------------------------------------------------- reading a recipe

_SECTIONS = {"data": {"recipe": str, "manifest_sha256": (str, type(None))},
             "tokenizer": {"vocab_size": int, "max_chars": int, "seed": int, "sha256": (str, type(None))},
             "index": {"max_chars": int},
             "sft_data": {"seed": int, "limit": (int, type(None)), "max_tokens": int, "stats_sha256": (str, type(None))}}
_PIECE = {"name": str, "stage": str, "steps": int, "base": (str, type(None)), "preset": (str, type(None)),
          "data": (str, type(None)), "set": dict, "options": dict, "inputs": dict, "recorded": dict}
_TOP = {"format", "name", "notes", "pieces", *_SECTIONS}


def _check(path: Path, where: str, obj: Any, types: dict, required: tuple[str, ...]) -> None:
    if not isinstance(obj, dict):
        raise RecipeError(f"{path}: {where} must be an object")
    if unknown := sorted(set(obj) - set(types)):
        raise RecipeError(f"{path}: {where}: unknown field {unknown[0]!r} (known: {', '.join(types)})")
    if missing := [k for k in required if k not in obj]:
        raise RecipeError(f"{path}: {where}: missing field {missing[0]!r}")
    for key, typ in types.items():
        if key in obj and (not isinstance(obj[key], typ) or isinstance(obj[key], bool)):
            raise RecipeError(f"{path}: {where}.{key}: wrong type {type(obj[key]).__name__} ({obj[key]!r:.40})")


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe; any problem is one RecipeError naming the file and the field."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise RecipeError(f"{path}: field 'format' must be {FORMAT!r}")
    if unknown := sorted(set(raw) - _TOP):
        raise RecipeError(f"{path}: unknown field {unknown[0]!r} (known: {', '.join(sorted(_TOP))})")
    for name, types in _SECTIONS.items():
        _check(path, name, raw.get(name), types, tuple(types))
    if not isinstance(raw.get("pieces"), list) or not raw["pieces"]:
        raise RecipeError(f"{path}: field 'pieces' must be a non-empty list")
    pieces: list[Piece] = []
    for i, p in enumerate(raw["pieces"]):
        where = f"pieces[{i}]" + (f" ({p['name']})" if isinstance(p, dict) and isinstance(p.get("name"), str) else "")
        _check(path, where, p, _PIECE, ("name", "stage", "steps"))
        if p["stage"] not in TRAINING:
            raise RecipeError(f"{path}: {where}.stage: {p['stage']!r} is not one of {', '.join(TRAINING)}")
        if p["steps"] < 1:
            raise RecipeError(f"{path}: {where}.steps: must be a positive integer, got {p['steps']}")
        if not p["name"] or "/" in p["name"] or p["name"] in {q.name for q in pieces} | {"tokenizer"}:
            raise RecipeError(f"{path}: {where}.name: must be a unique folder name, got {p['name']!r}")
        if p.get("base") is not None and p["base"] not in {q.name for q in pieces}:
            raise RecipeError(f"{path}: {where}.base: {p['base']!r} is not an earlier piece")
        if p.get("data") not in (None, "corpus", "sft-data"):
            raise RecipeError(f"{path}: {where}.data: must be 'corpus' or 'sft-data', got {p['data']!r}")
        if "max_steps" in p.get("set", {}):
            raise RecipeError(f"{path}: {where}.set.max_steps: give it as the piece's 'steps'")
        pieces.append(Piece(**p))
    notes = raw.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise RecipeError(f"{path}: field 'notes' must be a list of strings")
    return Recipe(path, str(raw.get("name", path.stem)), raw["data"], raw["tokenizer"], raw["index"], raw["sft_data"],
                  pieces, notes)


def stats_sha256(stats_path: Path) -> str:
    """The chat data's fingerprint: its stats.json (counts by kind and source, settings) without the timing."""
    stats = json.loads(stats_path.read_text())
    stats.pop("seconds", None)
    return hashlib.sha256(json.dumps(stats, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- replaying it

def _value(v: Any) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def piece_args(p: Piece, r: Release, resume: bool) -> list[str]:
    """The `builder` command line of a piece. Its `options` come last and win: `{"tokenizer": null}` drops the
    --tokenizer every piece gets, for a verb without one."""
    named: dict[str, Any] = {
        "out": r.runs / p.name, "tokenizer": r.tokenizer, "base": r.runs / p.base / "model.pth" if p.base else None,
        "preset": p.preset, "data": {"corpus": DATA, "sft-data": r.sft_data}.get(p.data or "")}
    named.update(p.options)
    args = [p.stage]
    for key, v in named.items():
        args += [f"--{key}"] if v is True else [] if v is False or v is None else [f"--{key}", _value(v)]
    args += ["--set", f"max_steps={p.steps}", *(a for k, v in p.set.items() for a in ("--set", f"{k}={_value(v)}"))]
    return args + (["--resume"] if resume else [])


def _differences(p: Piece, r: Release, run: dict, ckpt: dict) -> list[str]:
    """How an existing run folder differs from what the piece asks for (settings, tokenizer, base). A
    checkpoint without its run.json (one copied in from the registry) is checked for its tokenizer alone."""
    train = {**(run.get("model") or {}), **(run.get("train") or {})}
    # precision: a CPU without fast bf16 trains in fp32 whatever was asked (run.json records the choice)
    out = [f"{k}={train.get(k)!r} (recipe: {v!r})" for k, v in p.set.items()
           if k != "precision" and k in train and train[k] != v]
    tok = r.tokenizer / "tokenizer.model"
    if tok.is_file() and ckpt.get("tokenizer") not in (None, sha256_file(tok)):
        out.append(f"tokenizer {str(ckpt['tokenizer'])[:12]} (now {sha256_file(tok)[:12]})")
    base = r.runs / p.base / "model.pth" if p.base else None
    if base and base.is_file() and run.get("parent_sha256") not in (None, sha256_file(base)):
        out.append(f"base {base} changed since this run started from it")
    if ckpt.get("step", 0) > p.steps:
        out.append(f"step {ckpt['step']}, past the recipe's {p.steps}")
    return out


def _step(out: Path) -> int | None:
    from source.checkpoint import read_checkpoint

    return read_checkpoint(out / "model.pth").get("step") if (out / "model.pth").is_file() else None


def run_piece(p: Piece, recipe: Recipe, r: Release, deadline: float | None) -> None:
    """Skip, resume or start one piece, saying which and why."""
    from source.checkpoint import read_checkpoint
    from source.train import read_run_info

    out = r.runs / p.name
    # a finished later piece built on this one (e.g. a version's model.pth copied into its run folder) makes
    # this one unnecessary: appending pieces to a recipe does not replay the whole chain before them
    later = [q for q in recipe.pieces if q is not p and p in recipe.chain(q.name)]
    try:
        ckpt = read_checkpoint(out / "model.pth") if (out / "model.pth").is_file() else None
        diff = _differences(p, r, read_run_info(out), ckpt) if ckpt is not None else []
        step = ckpt.get("step") if ckpt is not None else None
        done = None if step == p.steps else next((q for q in later if _step(r.runs / q.name) == q.steps), None)
    except (OSError, ValueError) as exc:  # a damaged checkpoint or run.json: the message names it
        raise click.ClickException(f"piece {p.name!r}: {exc}") from None
    if diff:
        raise click.ClickException(f"{out} was trained with other inputs than piece {p.name!r} of the recipe: "
                                   f"{'; '.join(diff)}. Delete {out} to train it again.")
    if step == p.steps:
        r.log(f"recipe: {p.name:<12} skip    step {step} of {p.steps} reached ({out}/model.pth)")
        return
    if done:
        r.log(f"recipe: {p.name:<12} skip    not needed: {done.name}, built on it, is finished")
        return
    resume = step is not None and (out / "train_state.pt").is_file()
    if deadline is not None and time.monotonic() > deadline:
        raise Paused(f"--max-minutes reached before piece {p.name!r}; run the same command again to continue")
    if resume:
        why = f"its checkpoint is at step {step} of {p.steps}: resuming with --resume"
    elif step is not None:
        why = f"model.pth is at step {step} of {p.steps} but there is no train_state.pt to resume from: starting over"
    else:
        why = "no checkpoint yet: starting" + (f" from {p.base}" if p.base else " from scratch")
    r.log(f"recipe: {p.name:<12} {p.stage:<7} {why}")
    data = DATA / "manifest.json" if p.data == "corpus" else r.sft_data / "train.jsonl" if p.data else None
    if data and p.inputs.get("data_sha256") not in (None, sha256_file(data)):
        r.log(f"recipe: note: {data} is not the data piece {p.name!r} was first trained on "
              f"(sha256 {p.inputs['data_sha256'][:12]}...): this is a retraining, not a copy")
    r.cli(piece_args(p, r, resume))


def _note_if_differs(r: Release, what: str, recorded: str | None, now: str) -> None:
    if recorded and recorded != now:
        r.log(f"recipe: note: {what} differs from the recipe's ({recorded[:12]}... recorded, {now[:12]}... here): "
              "the replay retrains on other inputs")


def register(recipe: Recipe, r: Release) -> None:
    """Register the last piece (once: a rerun finds it by its weights' sha256), evaluate it, pick the champion."""
    from source.registry import Registry

    final = r.runs / recipe.pieces[-1].name / "model.pth"
    sha = sha256_file(final)
    reg = Registry(r.registry)
    known = [v for v in reg.versions() if any(f["path"].endswith("/model.pth") and f["sha256"] == sha for f in v.files)]
    root = ["models", "--root", str(r.registry)]
    if known:
        r.log(f"recipe: {final} is already registered as {known[-1].id}: not added again")
        vid = known[-1].id
    else:
        r.cli([*root, "add", str(final), "--tokenizer", str(r.tokenizer), "--dataset-manifest", str(DATA / "manifest.json"),
               "--recipe", str(recipe.path), "--notes", f"builder release --retrain: recipe {recipe.name} ({recipe.path})"])
        vid = reg.get("latest").id
    if reg.get(vid).metrics.get("grounded_qa") is None:
        r.cli(["eval", "--model", vid, "--root", str(r.registry), "--limit", str(r.p.eval_limit),
               "--sft-data", str(r.sft_data), "--data", str(DATA), "--index", str(INDEX)])
    r.cli([*root, "champion", "--auto"])
    r.write_lock(notes=f"retrained from {recipe.path} (sha256 {sha256_file(recipe.path)[:12]}...) as {vid}")


def retrain_stages(recipe: Recipe, deadline: float | None, only_training: bool) -> list[Stage]:
    """The release with its training replaced by the recipe: data and corpus check, tokenizer, index, chat data
    (cached by input hashes like any stage), each piece (always visited: it decides itself), registry, then
    export to docs as usual unless `only_training`."""
    t, ix, sd = recipe.tokenizer, recipe.index, recipe.sft_data
    data_recipe = Path(recipe.data["recipe"])

    def data(r: Release) -> None:
        r.cli(["data", "build", "--recipe", str(data_recipe), "--out", str(DATA), "--quiet"])

    def tokenizer(r: Release) -> None:
        have = r.tokenizer / "tokenizer.model"
        if t["sha256"] and have.is_file() and sha256_file(have) == t["sha256"]:  # e.g. copied from the version
            r.log(f"recipe: {r.tokenizer} is the tokenizer the recipe records (sha256 {t['sha256'][:12]}...): kept")
            return
        r.cli(["tokenizer", "train", "--data", str(DATA), "--out", str(r.tokenizer), "--vocab-size", str(t["vocab_size"]),
               "--max-chars", str(t["max_chars"]), "--seed", str(t["seed"])])

    def sft_data(r: Release) -> None:
        limit = ["--limit", str(sd["limit"])] if sd["limit"] else []
        r.cli(["sft-data", "--data", str(DATA), "--index", str(INDEX), "--out", str(r.sft_data), "--tokenizer",
               str(r.tokenizer), "--max-tokens", str(sd["max_tokens"]), "--seed", str(sd["seed"]), *limit, "--quiet"])

    def inputs(r: Release) -> None:
        if CORPUS_MANIFEST.is_file():
            _note_if_differs(r, f"the committed corpus manifest {CORPUS_MANIFEST}", recipe.data["manifest_sha256"],
                             sha256_file(CORPUS_MANIFEST))
        _note_if_differs(r, "the tokenizer", t["sha256"], sha256_file(r.tokenizer / "tokenizer.model"))
        _note_if_differs(r, "the chat data (stats.json)", sd["stats_sha256"], stats_sha256(r.sft_data / "stats.json"))

    by_name = {s.name: s for s in STAGES}
    stages = [
        Stage("data", lambda r: [data_recipe], lambda r: [DATA / "manifest.json"], data),
        by_name["corpus"],
        Stage("tokenizer", lambda r: [DATA / "manifest.json", t["vocab_size"], t["max_chars"], t["seed"]],
              lambda r: [r.tokenizer / "tokenizer.model"], tokenizer),
        Stage("index", lambda r: [DATA / "manifest.json", ix], lambda r: [INDEX / "meta.json"],
              lambda r: r.cli(["index", "build", "--data", str(DATA), "--out", str(INDEX), "--max-chars",
                               str(ix["max_chars"]), "--quiet"])),
        Stage("sft-data", lambda r: [INDEX, r.tokenizer / "tokenizer.model", sd["seed"], sd["limit"], sd["max_tokens"]],
              lambda r: [r.sft_data / "train.jsonl"], sft_data),
        Stage("inputs", lambda r: [], lambda r: [], inputs, always=True),
        *(Stage(f"piece:{p.name}", lambda r: [], lambda r: [], lambda r, p=p: run_piece(p, recipe, r, deadline), always=True)
          for p in recipe.pieces),
        Stage("registry", lambda r: [], lambda r: [], lambda r: register(recipe, r), always=True),
    ]
    if not only_training:
        stages += [by_name[n] for n in ("export", "natural", "card", "site", "docs")]
    return stages


def recipe_lineage(recipe: Recipe, checkpoint: Path, from_runs: list[dict]) -> list[dict]:
    """The lineage of a checkpoint trained by `recipe`: the run folders' record where it exists, the recipe's
    settings (marked "source": "recipe") for the pieces whose folders are gone."""
    leaf = next((p for p in recipe.pieces if p.name == checkpoint.parent.name), None)
    if leaf is None:
        return from_runs
    by_name = {piece["name"]: piece for piece in from_runs}
    return [{**by_name[p.name], "parent": p.base, "source": "run"} if p.name in by_name else
            {"name": p.name, "stage": p.stage, "parent": p.base, "data_sha256": p.inputs.get("data_sha256"),
             "steps": p.steps, "seed": p.set.get("seed"), "lr": p.set.get("lr"),
             "warmup_steps": p.set.get("warmup_steps"), "wall_seconds": p.recorded.get("seconds"), "source": "recipe"}
            for p in recipe.chain(leaf.name)]
