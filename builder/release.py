"""`builder release`: the whole pipeline, corpus to a publishable Pages folder, with stage caching.

Reads like nanochat's speedrun.sh: `STAGES` below is the pipeline, top to bottom, and each stage runs
the same `builder` verb a maintainer would type. Design choices:
- A stage is skipped ("cached") when the sha256 of its inputs (files it reads + its settings) equals
  the one recorded in dist/release-state.json the last time it succeeded and its outputs still exist.
- Training is expensive and its result is committed: models/release.lock.json records the inputs
  (recipe, presets, steps) the champion was trained from. When the lock matches the profile and the
  champion still exists, tokenizer/pretrain/sft-data/sft/registry are cached even in a clean clone,
  and the release goes straight to export/card/site/docs.
- Publishing is all or nothing: the site and docs are assembled in dist/.pages.partial and renamed to
  dist/pages only at the end; a failing export gate stops the release before that.
- The built corpus must be the committed one (datasets/manifests/default.json: sources' versions and
  hashes, record counts, output hashes): another machine's Python manual or standard library would
  silently change what retrieval finds. A mismatch stops the release unless accepted, which rewrites
  the committed manifest for review.
- `--profile quick` trains the tiny preset end to end into dist/quick/ (its own registry), so it can
  run from an empty checkout without touching models/.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import click

from builder.site import SITE_DTYPE, onnx_file
from source.files import atomic_write_bytes, replace_dir, sha256_file


@dataclass(frozen=True)
class Profile:
    name: str
    preset: str
    vocab_size: int
    pretrain_steps: int
    sft_steps: int
    sft_lr: float
    registry: str  # registry folder
    runs: str  # where training runs go
    sft_data: str  # chat examples folder
    sft_examples: int | None  # None: the generator's default
    eval_limit: int
    natural_sample: int | None = None  # natural questions scored per path when the champion changes (None: all)
    dpo_mine: int = 2000  # SFT training examples the SFT model answers to mine preference pairs from
    dpo_steps: int = 0  # 0: no preference stage; the registry takes the SFT model (DPO on v10 measured worse)


PROFILES = {
    "default": Profile("default", "small", 8192, 550, 900, 1e-3, "models", "runs", "datasets/built/sft", None, 200),
    "quick": Profile("quick", "tiny", 4096, 300, 150, 1e-3, "dist/quick/models", "dist/quick/runs", "dist/quick/sft", 4000, 40,
                     natural_sample=20, dpo_mine=200, dpo_steps=30),  # the stage stays exercised
}
NOT_TRAINING = ("registry", "runs", "sft_data", "natural_sample")  # profile fields the training lock ignores
LOCK = "release.lock.json"  # inside the profile's registry folder
DIST = Path("dist")
DATA, INDEX = Path("datasets/built/default"), Path("datasets/built/index")
RECIPE = Path("datasets/recipes/default.json")
CORPUS_MANIFEST = Path("datasets/manifests/default.json")  # the corpus the committed release was built from
QUESTIONS = Path("datasets/eval/natural.jsonl")
NATURAL = "eval-natural.json"  # in the champion's folder: its natural questions through torch, onnx and the site
SITE_CHECK = 50  # a cached release re-asks this many natural questions through the site
NATURAL_NEW_TOKENS = 128  # longest reply scored: the answers are a sentence or two, and it fits a 256-token window


def digest(*parts: object) -> str:
    """sha256 over files (by content), folders (every file, sorted) and plain values."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            files = sorted(p for p in part.rglob("*") if p.is_file()) if part.is_dir() else [part]
            for f in files:
                h.update(f.as_posix().encode())
                h.update(sha256_file(f).encode() if f.is_file() else b"missing")
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


@dataclass
class Stage:
    name: str
    inputs: Callable[["Release"], list]
    outputs: Callable[["Release"], list[Path]]
    run: Callable[["Release"], None]
    training: bool = False  # covered by models/release.lock.json
    always: bool = False  # cheap and written into the fresh partial folder: never cached


class Release:
    def __init__(self, profile: Profile, cli: Callable[[list[str]], None], log: Callable[[str], None] = print,
                 accept_corpus_change: bool = False) -> None:
        self.p, self.cli, self.log = profile, cli, log
        self.accept_corpus_change = accept_corpus_change
        self.runs, self.registry, self.sft_data = Path(profile.runs), Path(profile.registry), Path(profile.sft_data)
        self.tokenizer = self.runs / "tokenizer"
        self.base, self.sft = self.runs / f"base-{profile.preset}", self.runs / f"sft-{profile.preset}"
        self.dpo = self.runs / f"dpo-{profile.preset}"
        self.final = self.dpo if profile.dpo_steps else self.sft  # the run the registry takes
        self.export, self.card = DIST / "export", DIST / "card" / "README.md"
        self.pages, self.partial = DIST / "pages", DIST / ".pages.partial"
        self.state_path = DIST / f"release-state-{profile.name}.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        self.report: list[dict] = []
        self.natural: dict | None = None  # figures for the release manifest

    # -- the lock that lets a clean clone skip training

    def training_inputs(self) -> str:
        return digest(RECIPE, {k: v for k, v in asdict(self.p).items() if k not in NOT_TRAINING})

    def natural_inputs(self) -> str:
        """What the champion's natural figures are keyed by: the model, the ONNX file the site ships, the page's
        code, the questions and the retrieval index (its files and ranking settings, not when or from
        which folder it was built; the corpus check makes a clean clone's index the committed one)."""
        web = sorted(p for p in Path("web_static").glob("*") if p.is_file())
        meta = json.loads((INDEX / "meta.json").read_text())
        ranking = {k: v for k, v in meta.items() if k not in ("created", "data_dir", "manifest_sha256")}
        return digest(self.champion_dir() / "model.pth", self.export / onnx_file(SITE_DTYPE), QUESTIONS,
                      *web, self.p.natural_sample, ranking, *(INDEX / part for part in ("docs.bin", "terms", "keys", "text")))

    def lock(self) -> dict | None:
        path = self.registry / LOCK
        return json.loads(path.read_text()) if path.is_file() else None

    def champion_dir(self) -> Path:
        registry = json.loads((self.registry / "registry.json").read_text())
        return self.registry / "versions" / registry["champion"]

    def training_cached(self) -> str | None:
        lock = self.lock()
        if not lock or lock.get("inputs_sha256") != self.training_inputs():
            return None
        try:
            folder = self.champion_dir()
        except (OSError, KeyError, ValueError):
            return None
        if folder.name != lock.get("champion") or not (folder / "model.pth").is_file():
            return None
        return folder.name

    def write_lock(self, notes: str | None = None) -> None:
        """`notes` says how the champion was really trained where that differs from the profile."""
        lock = {"profile": self.p.name, "champion": self.champion_dir().name, "inputs_sha256": self.training_inputs(),
                "profile_settings": asdict(self.p), "recipe": str(RECIPE)}
        if notes:
            lock["notes"] = notes
        atomic_write_bytes(self.registry / LOCK, (json.dumps(lock, indent=2) + "\n").encode())

    # -- running

    def execute(self, stages: list[Stage], force: set[str]) -> None:
        trained = None if force & {s.name for s in stages if s.training} else self.training_cached()
        for stage in stages:
            t0 = time.perf_counter()
            if stage.training and trained and stage.name not in force:
                self._record(stage, "cached", 0.0, f"champion {trained} (models lock matches)")
                continue
            key = digest(*stage.inputs(self))
            done = self.state.get(stage.name) == key and all(p.exists() for p in stage.outputs(self))
            if done and not stage.always and stage.name not in force:
                self._record(stage, "cached", 0.0, "inputs unchanged")
                continue
            self.log(f"release: == {stage.name} ==")
            stage.run(self)
            self.state[stage.name] = digest(*stage.inputs(self))  # inputs may be outputs of this very stage
            DIST.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.state_path, (json.dumps(self.state, indent=2) + "\n").encode())
            self._record(stage, "ran", time.perf_counter() - t0, "")

    def _record(self, stage: Stage, status: str, seconds: float, note: str) -> None:
        self.report.append({"stage": stage.name, "status": status, "seconds": round(seconds, 1), "note": note})
        self.log(f"release: {stage.name:<10} {status:<7} {seconds:7.1f} s  {note}".rstrip())

    def publish(self, started: float) -> dict:
        manifest = json.loads((self.export / "manifest.json").read_text())
        release = {
            "format": "supermix-release-v1", "profile": asdict(self.p),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "champion": self.champion_dir().name, "model_version": manifest.get("model_version"),
            "versions": manifest.get("versions"), "gates": manifest["gates"], "speed": manifest.get("speed"),
            "natural": self.natural, "stages": self.report, "seconds": round(time.perf_counter() - started, 1),
            "hashes": {"export_manifest": sha256_file(self.export / "manifest.json"),
                       "card": sha256_file(self.card), "registry": sha256_file(self.registry / "registry.json")},
        }
        replace_dir(self.partial, self.pages)
        release["pages_bytes"] = sum(p.stat().st_size for p in self.pages.rglob("*") if p.is_file())
        atomic_write_bytes(DIST / "release-manifest.json", (json.dumps(release, indent=2) + "\n").encode())
        return release


# ----------------------------------------------------------------------------- the pipeline

def _train_args(r: Release, verb: str, out: Path, steps: int, *extra: str) -> list[str]:
    resume = ["--resume"] if (out / "train_state.pt").is_file() else []
    return [verb, "--preset", r.p.preset, "--tokenizer", str(r.tokenizer), "--out", str(out), *resume,
            "--set", f"max_steps={steps}", *extra]


def _sft_data(r: Release) -> None:
    from source.config import MODEL_PRESETS, SFT_PRESETS

    limit = ["--limit", str(r.p.sft_examples)] if r.p.sft_examples else []
    # examples must fit the SFT window, or the chat batches would cut the answers off
    window = min(MODEL_PRESETS[r.p.preset]["max_seq_len"], SFT_PRESETS[r.p.preset]["seq_len"])
    r.cli(["sft-data", "--data", str(DATA), "--index", str(INDEX), "--out", str(r.sft_data), "--tokenizer",
           str(r.tokenizer), "--max-tokens", str(window), *limit, "--quiet"])


def _dpo(r: Release) -> None:
    """Preference tuning of the SFT model on pairs mined from its own greedy answers to training questions."""
    if not r.p.dpo_steps:
        r.log("release: dpo: the profile has no preference stage (dpo_steps 0)")
        return
    r.cli(_train_args(r, "dpo", r.dpo, r.p.dpo_steps, "--base", str(r.sft / "model.pth"), "--mine", str(r.p.dpo_mine),
                      "--data", str(r.sft_data), "--quiet"))


def _registry(r: Release) -> None:
    root = ["models", "--root", str(r.registry)]
    dpo = f" + DPO {r.p.dpo_steps} steps ({r.p.dpo_mine} examples mined)" if r.p.dpo_steps else " steps"
    r.cli([*root, "add", str(r.final / "model.pth"), "--tokenizer", str(r.tokenizer),
           "--dataset-manifest", str(DATA / "manifest.json"),
           "--notes", f"builder release --profile {r.p.name}: {r.p.preset}, pretrain {r.p.pretrain_steps} + "
                      f"SFT {r.p.sft_steps}{dpo}"])
    r.cli(["eval", "--model", "latest", "--root", str(r.registry), "--limit", str(r.p.eval_limit),
           "--sft-data", str(r.sft_data), "--data", str(DATA), "--index", str(INDEX)])
    r.cli([*root, "champion", "--auto"])
    r.write_lock()


def _corpus(r: Release) -> None:
    """Compare the built corpus with the committed manifest; the first build of a recipe records it."""
    from source.corpus.build import manifest_differences

    built = json.loads((DATA / "manifest.json").read_text())
    write = (json.dumps(built, indent=2, ensure_ascii=False) + "\n").encode()
    if not CORPUS_MANIFEST.is_file():
        atomic_write_bytes(CORPUS_MANIFEST, write)
        r.log(f"release: recorded the corpus in {CORPUS_MANIFEST} (commit it)")
        return
    differences = manifest_differences(json.loads(CORPUS_MANIFEST.read_text()), built)
    if not differences:
        return
    shown = "\n  ".join(differences[:12]) + (f"\n  ... {len(differences) - 12} more" if len(differences) > 12 else "")
    if not r.accept_corpus_change:
        raise click.ClickException(
            f"the corpus built here ({DATA / 'manifest.json'}) is not the committed one ({CORPUS_MANIFEST}):\n  {shown}\n"
            "A different Python, python3-doc, WordNet or FOLDOC version changes what retrieval finds and what the "
            "site ships. Build where the versions match (see .github/workflows/pages.yml), or pass "
            "--accept-corpus-change to continue and rewrite the committed manifest for review.")
    atomic_write_bytes(CORPUS_MANIFEST, write)
    r.log(f"release: corpus change accepted ({len(differences)} fields); {CORPUS_MANIFEST} rewritten: review and commit it")


def _natural(r: Release) -> None:
    """The champion's natural questions through torch, the ONNX file the site ships and the site in Chromium, once per
    champion (stored beside it, keyed by `natural_inputs`); a cached release re-asks SITE_CHECK of them
    through the site and compares the replies with the stored ones."""
    if not QUESTIONS.is_file():
        r.log(f"release: no {QUESTIONS}; natural questions skipped")
        return
    stored_path, key = r.champion_dir() / NATURAL, r.natural_inputs()
    stored = json.loads(stored_path.read_text()) if stored_path.is_file() else {}
    site = DIST / ".natural-site"  # the site as it ships, minus the card (which shows these figures)
    r.cli(["site", "--export", str(r.export), "--out", str(site)])
    common = ["eval", "--questions", str(QUESTIONS), "--no-held-out", "--model", "champion", "--root", str(r.registry),
              "--index", str(INDEX), "--export", str(r.export), "--site", str(site), "--max-new-tokens", str(NATURAL_NEW_TOKENS), "--quiet"]
    try:
        if stored.get("inputs_sha256") == key:
            check = DIST / "natural-site-check.json"
            r.cli([*common, "--via", "site", "--sample", str(SITE_CHECK), "--out", str(check)])
            now = json.loads(check.read_text())["natural"]["paths"]["site"]["items"]
            before = {it["id"]: it["reply"] for it in stored["natural"]["paths"]["site"]["items"]}
            same = [it["id"] for it in now if before.get(it["id"]) == it["reply"]]
            r.natural = {"cached": True, "site_check": {"items": len(now), "same_reply": len(same) / max(1, len(now)),
                                                        "differ": [it["id"] for it in now if it["id"] not in same]}}
        else:
            sample = ["--sample", str(r.p.natural_sample)] if r.p.natural_sample else []
            out = DIST / "natural-full.json"
            r.cli([*common, "--via", "torch,onnx,site", *sample, "--out", str(out)])
            stored = {"inputs_sha256": key, **json.loads(out.read_text())}
            atomic_write_bytes(stored_path, (json.dumps(stored, indent=1, ensure_ascii=False) + "\n").encode())
            r.natural = {"cached": False}
    finally:
        shutil.rmtree(site, ignore_errors=True)
    nat = stored["natural"]
    r.natural.update(file=str(stored_path), n_items=nat["n_items"], agreement=nat.get("agreement"),
                     overall={path: run["metrics"]["overall"] for path, run in nat["paths"].items()})


def _site(r: Release) -> None:
    shutil.rmtree(r.partial, ignore_errors=True)
    r.cli(["site", "--export", str(r.export), "--out", str(r.partial), "--card", str(r.card)])


def _docs(r: Release) -> None:
    r.cli(["docs", "--out", str(r.partial / "docs"), "--card", str(r.card), "--root", str(r.registry)])


STAGES = [
    Stage("data", lambda r: [RECIPE], lambda r: [DATA / "manifest.json"],
          lambda r: r.cli(["data", "build", "--recipe", str(RECIPE), "--out", str(DATA), "--quiet"])),
    Stage("corpus", lambda r: [], lambda r: [], _corpus, always=True),
    Stage("tokenizer", lambda r: [DATA / "manifest.json", r.p.vocab_size], lambda r: [r.tokenizer / "tokenizer.model"],
          lambda r: r.cli(["tokenizer", "train", "--data", str(DATA), "--out", str(r.tokenizer), "--vocab-size",
                           str(r.p.vocab_size)]), training=True),
    Stage("pretrain", lambda r: [r.tokenizer / "tokenizer.model", DATA / "manifest.json", asdict(r.p)],
          lambda r: [r.base / "model.pth"],
          lambda r: r.cli(_train_args(r, "pretrain", r.base, r.p.pretrain_steps, "--data", str(DATA), "--no-samples")),
          training=True),
    Stage("index", lambda r: [DATA / "manifest.json"], lambda r: [INDEX / "meta.json"],
          lambda r: r.cli(["index", "build", "--data", str(DATA), "--out", str(INDEX), "--quiet"])),
    Stage("sft-data", lambda r: [INDEX, r.tokenizer / "tokenizer.model", r.p.sft_examples],
          lambda r: [r.sft_data / "train.jsonl"], _sft_data, training=True),
    Stage("sft", lambda r: [r.base / "model.pth", r.sft_data / "train.jsonl", asdict(r.p)], lambda r: [r.sft / "model.pth"],
          lambda r: r.cli(_train_args(r, "sft", r.sft, r.p.sft_steps, "--base", str(r.base / "model.pth"),
                                      "--data", str(r.sft_data), "--set", f"lr={r.p.sft_lr}", "--samples", "0")),
          training=True),
    Stage("dpo", lambda r: [r.sft / "model.pth", r.sft_data / "train.jsonl", asdict(r.p)],
          lambda r: [r.final / "model.pth"], _dpo, training=True),
    Stage("registry", lambda r: [r.final / "model.pth"], lambda r: [r.registry / LOCK], _registry, training=True),
    Stage("export", lambda r: [r.registry / "registry.json", INDEX], lambda r: [r.export / "manifest.json"],
          lambda r: r.cli(["export", "--model", "champion", "--root", str(r.registry), "--out", str(r.export),
                           "--index", str(INDEX), "--data", str(DATA)])),
    Stage("natural", lambda r: [], lambda r: [], _natural, always=True),
    Stage("card", lambda r: [r.export / "manifest.json", r.registry / "registry.json",
                             r.champion_dir() / NATURAL], lambda r: [r.card],
          lambda r: r.cli(["card", "--model", "champion", "--root", str(r.registry), "--export", str(r.export),
                           "--dataset-manifest", str(DATA / "manifest.json"), "--out", str(r.card)])),
    # the site and the docs are always rebuilt: they are cheap and land in the fresh partial folder
    Stage("site", lambda r: [r.card, r.export / "manifest.json"], lambda r: [], _site, always=True),
    Stage("docs", lambda r: [r.card], lambda r: [], _docs, always=True),
]
STAGE_NAMES = [s.name for s in STAGES]


def select(start: str | None, only: str | None) -> tuple[list[Stage], set[str]]:
    """(stages to consider, stages forced to run) for --from / --only."""
    if only:
        stages = [s for s in STAGES if s.name == only]
        if only not in ("site", "docs"):
            return stages, {only}
        return [s for s in STAGES if s.name in ("site", "docs")], {"site", "docs"}
    if start:
        i = STAGE_NAMES.index(start)
        return STAGES, set(STAGE_NAMES[i:])
    return STAGES, set()
