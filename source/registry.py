"""The model registry: `models/registry.json` (versions, lineage, metrics, champion) plus one self-contained
folder per version, `models/versions/vN/{model.pth, tokenizer/, model_info.json, README.md, *_metrics.jsonl}`.

- ids `v1, v2, ...` come from a `next_id` counter: a removed number is never reused, "v3" is one model forever
- registry.json is written last, atomically (temp + rename): a failed add leaves it as it was and deletes
  its folder; a folder left by a killed process has no entry, is ignored, and is cleaned up by the next add
- `files` hashes the artifacts (model.pth, tokenizer/*, training logs: source.run_logs) by paths relative to
  `models/`, so the repo can move; model_info.json and README.md are derived from the entry
- the champion is explicit (`promote`) or picked by one written rule (`CHAMPION_RULE`), never implied
- a parent may be a removed version: lineage is history
- writers (add, set_metrics, promote, remove) hold an exclusive flock on `.registry.lock` in the registry
  root from reading registry.json to writing it: two adds at once used to pick the same vN and delete each
  other's folder, and a promote during an add wrote back a registry without the new version. Readers take
  no lock: registry.json is replaced atomically, so they see the old file or the new one
- imported Hugging Face bases (source.hf_base) live in a "bases" object, name -> entry, written only when there
  is one: they are referenced by path and hashes, not versions with a folder here
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from source.files import atomic_write_bytes, sha256_file
from source.lineage import check_lineage, lineage_from_runs
from source.run_logs import run_logs
from source.version_summary import finite_number as _num, training_summary, version_readme

FORMAT = "supermix-registry-v1"
KINDS = ("pretrain", "sft", "lora-merged", "dpo")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
HF_OPTIONAL = ("special_tokens_map.json", "chat_template.jinja")
CHAMPION_RULE = ("highest natural_site_correct (hand-written questions through the site) wins; ties, and "
                 "versions without it, are ranked by highest grounded_qa, then by lowest val_bpb; a version with "
                 "none of them is never picked; a full tie keeps the older version")
RANKED = {"natural_site_correct": "highest", "grounded_qa": "highest", "val_bpb": "lowest"}  # CHAMPION_RULE's order
_ID = re.compile(r"v([1-9][0-9]*)")
LOCK_NAME = ".registry.lock"


class RegistryError(ValueError):
    """A registry problem a user can act on; the message names the file and the field or version."""


def tokenizer_files(folder: Path) -> tuple[list[str], str]:
    """(the files a version keeps of its tokenizer folder, the one whose sha256 the checkpoint records). Ours:
    tokenizer.model and its exports. A Hugging Face base's (a version fine-tuned from an imported base):
    tokenizer.json, tokenizer_config.json, whichever of special_tokens_map.json and chat_template.jinja it has,
    and its licence file, so the version folder is self-contained."""
    if (folder / "tokenizer.model").is_file() or not (folder / "tokenizer.json").is_file():
        return list(TOKENIZER_FILES), "tokenizer.model"
    extra = sorted(p.name for p in folder.iterdir() if p.is_file() and (
        p.name in HF_OPTIONAL or re.fullmatch(r"(licen[cs]e|copying)(\.(txt|md))?", p.name, re.IGNORECASE)))
    return ["tokenizer.json", "tokenizer_config.json", *extra], "tokenizer.json"


def _ckpt():
    # source.checkpoint pulls in torch (slow to import): imported on first use so `builder models list` stays instant;
    # only reading a .pth needs it
    import source.checkpoint as ckpt
    return ckpt


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _sorted(d: dict) -> dict:
    return {k: _sorted(v) if isinstance(v, dict) else v for k, v in sorted(d.items())}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _fmt(x: float | None) -> str:
    return "none" if x is None else f"{x:.4g}"


@dataclass
class Version:
    id: str
    created: str  # ISO 8601 UTC
    parent: str | None
    kind: str
    config: dict
    params: int
    tokenizer_sha256: str
    dataset_manifest_sha256: str | None = None
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    files: list[dict] = field(default_factory=list)  # [{path (relative to models/), bytes, sha256}]
    notes: str = ""
    lineage: list[dict] = field(default_factory=list)  # the pieces that made it (source.lineage); [] if unrecorded

    @property
    def number(self) -> int:
        return int(self.id[1:])

    def metric(self, name: str) -> float | None:
        return _num(self.metrics.get(name))

    def to_dict(self) -> dict:
        return {k: _sorted(v) if isinstance(v, dict) else v for k, v in asdict(self).items()}


_FIELDS = {f.name for f in fields(Version)}
_REQUIRED = ("id", "created", "parent", "kind", "config", "params", "tokenizer_sha256", "files")
_TYPES = {"created": str, "parent": (str, type(None)), "kind": str, "config": dict, "params": int,
          "tokenizer_sha256": str, "dataset_manifest_sha256": (str, type(None)), "training": dict,
          "metrics": dict, "files": list, "notes": str, "lineage": list}


class Registry:
    """`Registry("models")`: every call reads registry.json afresh; every change rewrites it."""

    def __init__(self, root: str | os.PathLike = "models") -> None:
        self.root, self.path = Path(root), Path(root) / "registry.json"

    @contextlib.contextmanager
    def _writer(self) -> Iterator[None]:
        """One writer at a time, across processes. The kernel drops a flock when its holder dies, so a killed
        add never leaves the registry locked (a lock *file* that merely exists would)."""
        import fcntl  # POSIX only: imported here so reading a registry (the runtime) still works without it

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_NAME, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield  # closing the file releases the lock

    def load(self) -> dict:
        """The validated registry {champion, champion_reason, next_id, versions: [Version]}; no file = empty."""
        if not self.path.exists():
            return {"champion": None, "champion_reason": None, "next_id": 1, "versions": [], "bases": {}}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RegistryError(f"{self.path}: not valid JSON (line {exc.lineno}, column {exc.colno}: "
                                f"{exc.msg})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RegistryError(f"{self.path}: cannot read ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise RegistryError(f"{self.path}: field 'format' is {found!r}, expected {FORMAT!r}")
        if not isinstance(data.get("versions"), list):
            raise RegistryError(f"{self.path}: field 'versions' must be a list")
        versions = [self._parse_version(i, raw) for i, raw in enumerate(data["versions"])]
        ids = [v.id for v in versions]
        if dup := sorted({i for i in ids if ids.count(i) > 1}):
            raise RegistryError(f"{self.path}: duplicate version id(s) {', '.join(dup)}")
        champion = data.get("champion")
        if champion is not None and champion not in ids:
            raise RegistryError(f"{self.path}: field 'champion' is {champion!r}, which is not in the registry")
        next_id = data.get("next_id", 1)
        if not isinstance(next_id, int) or isinstance(next_id, bool) or next_id < 1:
            raise RegistryError(f"{self.path}: field 'next_id' must be a positive integer, got {next_id!r}")
        for v in versions:  # a removed parent is fine (history); a number never issued, or a later one, is not
            if v.parent is not None and not (_ID.fullmatch(v.parent) and int(v.parent[1:]) < v.number):
                raise RegistryError(f"{self.path}: version {v.id}: parent {v.parent!r} is not an earlier version")
        bases = data.get("bases", {})
        if not isinstance(bases, dict) or not all(isinstance(b, dict) for b in bases.values()):
            raise RegistryError(f"{self.path}: field 'bases' must be an object of name -> entry")
        return {"champion": champion, "champion_reason": data.get("champion_reason"),
                "next_id": max([next_id, *(v.number + 1 for v in versions)]), "versions": versions, "bases": bases}

    def _parse_version(self, i: int, raw: Any) -> Version:
        where = f"{self.path}: versions[{i}]" + (f" ({raw['id']})" if isinstance(raw, dict) and "id" in raw else "")
        if not isinstance(raw, dict):
            raise RegistryError(f"{where}: expected an object")
        if missing := [k for k in _REQUIRED if k not in raw]:
            raise RegistryError(f"{where}: missing field(s) {', '.join(missing)}")
        if unknown := sorted(set(raw) - _FIELDS):
            raise RegistryError(f"{where}: unknown field(s) {', '.join(unknown)}")
        if not isinstance(raw["id"], str) or not _ID.fullmatch(raw["id"]):
            raise RegistryError(f"{where}: field 'id' must look like 'v1', got {raw['id']!r}")
        for key, typ in _TYPES.items():
            if key in raw and (not isinstance(raw[key], typ) or isinstance(raw[key], bool)):
                raise RegistryError(f"{where}: field {key!r} has the wrong type: {raw[key]!r:.60}")
        if raw["kind"] not in KINDS:
            raise RegistryError(f"{where}: field 'kind' is {raw['kind']!r}, expected one of {', '.join(KINDS)}")
        if "lineage" in raw and (problem := check_lineage(raw["lineage"])):
            raise RegistryError(f"{where}: field 'lineage' {problem}")
        for j, f in enumerate(raw["files"]):
            if not (isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("bytes"), int)
                    and isinstance(f.get("sha256"), str)):
                raise RegistryError(f"{where}: files[{j}] must be {{path, bytes, sha256}}, got {f!r:.80}")
        return Version(**raw)

    def versions(self) -> list[Version]:
        return self.load()["versions"]

    def get(self, ref: str) -> Version:
        """A version by "v3", "3", "champion" or "latest"."""
        return self._find(self.load(), ref)

    def _find(self, state: dict, ref: str) -> Version:
        versions, ref = state["versions"], str(ref).strip().lower()
        if ref == "champion":
            if state["champion"] is None:
                raise RegistryError(f"{self.path}: no champion yet (promote one, or pick one by the rule)")
            ref = state["champion"]
        if ref == "latest":
            if not versions:
                raise RegistryError(f"{self.path}: the registry has no versions yet")
            return max(versions, key=lambda v: v.number)
        vid = ref if ref.startswith("v") else f"v{ref}"
        if found := [v for v in versions if v.id == vid]:
            return found[0]
        known = ", ".join(v.id for v in versions) or "none"
        raise RegistryError(f"{self.path}: no version {ref!r} (known: {known})")

    def champion(self) -> Version | None:
        state = self.load()
        return self._find(state, state["champion"]) if state["champion"] else None

    def lineage(self, ref: str) -> list[str]:
        """[id, parent, grandparent, ...]; a removed ancestor ends the chain as "vN (removed)"."""
        state = self.load()
        by_id = {v.id: v for v in state["versions"]}
        chain = [self._find(state, ref).id]
        while chain[-1] in by_id and (parent := by_id[chain[-1]].parent):
            chain.append(parent)
        return [c if c in by_id else f"{c} (removed)" for c in chain]

    def strays(self) -> list[Path]:
        """Folders under versions/ with no registry entry (left by a killed process): ignored; add removes them."""
        known, folder = {v.id for v in self.versions()}, self.root / "versions"
        return sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in known) if folder.is_dir() else []

    def _save(self, state: dict) -> None:
        data = {"format": FORMAT, "champion": state["champion"], "champion_rule": CHAMPION_RULE,
                "champion_reason": state["champion_reason"], "next_id": state["next_id"],
                "versions": [v.to_dict() for v in sorted(state["versions"], key=lambda v: v.number)]}
        if state["bases"]:
            data["bases"] = dict(sorted(state["bases"].items()))
        atomic_write_bytes(self.path, _json_bytes(data))

    def _write_docs(self, v: Version, folder: Path | None = None) -> None:
        folder = folder or self.root / "versions" / v.id
        if folder.is_dir():
            atomic_write_bytes(folder / "model_info.json", _json_bytes(v.to_dict()))
            atomic_write_bytes(folder / "README.md", version_readme(v).encode("utf-8"))

    def add(self, checkpoint_path: str | os.PathLike, tokenizer_dir: str | os.PathLike, *, parent: str | None = None,
            metrics: dict | None = None, training: dict | None = None, notes: str = "",
            dataset_manifest_sha256: str | None = None, lineage: list[dict] | None = None) -> Version:
        """Copy a checkpoint and its tokenizer into versions/vN and register them as vN. Training summary and
        val_bpb come from the checkpoint and its run folder (`training_summary`); `training`/`metrics` override.
        `lineage` defaults to the chain of run folders behind the checkpoint (`source.lineage`)."""
        with self._writer():  # vN is claimed, staged, moved in place and registered under one lock
            return self._add(checkpoint_path, tokenizer_dir, parent=parent, metrics=metrics, training=training,
                             notes=notes, dataset_manifest_sha256=dataset_manifest_sha256, lineage=lineage)

    def _add(self, checkpoint_path: str | os.PathLike, tokenizer_dir: str | os.PathLike, *, parent: str | None,
             metrics: dict | None, training: dict | None, notes: str, dataset_manifest_sha256: str | None,
             lineage: list[dict] | None) -> Version:
        ck, state, checkpoint_path, tokenizer_dir = _ckpt(), self.load(), Path(checkpoint_path), Path(tokenizer_dir)
        parent_id = self._find(state, parent).id if parent is not None else None
        try:
            ckpt = ck.read_checkpoint(checkpoint_path)
        except (FileNotFoundError, ValueError) as exc:
            raise RegistryError(str(exc)) from None
        tok_files, tok_main = tokenizer_files(tokenizer_dir)
        if missing := [n for n in tok_files if not (tokenizer_dir / n).is_file()]:
            raise RegistryError(f"{tokenizer_dir}: tokenizer folder lacks {', '.join(missing)}")
        tok_sha = sha256_file(tokenizer_dir / tok_main)
        if ckpt["tokenizer"] != tok_sha:
            raise RegistryError(f"{checkpoint_path}: trained with tokenizer sha256 {ckpt['tokenizer'][:12]}..., but "
                                f"{tokenizer_dir}/{tok_main} has {tok_sha[:12]}...: wrong tokenizer folder")
        if (kind := ckpt.get("kind", "pretrain")) not in KINDS:
            raise RegistryError(f"{checkpoint_path}: checkpoint kind {kind!r} is not one of {', '.join(KINDS)}")
        derived, val_bpb = training_summary(ckpt, checkpoint_path)
        vid = f"v{state['next_id']}"
        version = Version(
            id=vid, created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), parent=parent_id, kind=kind,
            config=dict(ckpt["config"]), tokenizer_sha256=tok_sha,
            params=int(ckpt.get("params") or sum(t.numel() for t in ckpt["model"].values())),
            dataset_manifest_sha256=dataset_manifest_sha256 or ckpt.get("corpus_manifest_sha256"),
            training={**derived, **(training or {})}, notes=notes,
            lineage=lineage if lineage is not None else lineage_from_runs(checkpoint_path, ckpt.get("step")),
            metrics={**({"val_bpb": val_bpb} if val_bpb is not None else {}), **(metrics or {})})

        final, staging = self.root / "versions" / vid, self.root / "versions" / f".staging-{vid}"
        saved = False
        try:
            for stray in self.strays():  # leftovers of killed adds/removes (a live writer would hold the lock)
                shutil.rmtree(stray)
            (staging / "tokenizer").mkdir(parents=True)
            sources = {"model.pth": checkpoint_path, **{f"tokenizer/{n}": tokenizer_dir / n for n in tok_files}}
            logs = run_logs(ckpt, checkpoint_path)  # runs/ is not in git: keep what the card's loss curve needs
            for rel, src in {**sources, **logs}.items():
                if rel in logs:
                    atomic_write_bytes(staging / rel, src)
                else:
                    shutil.copyfile(src, staging / rel)
                version.files.append({"path": f"versions/{vid}/{rel}", "bytes": (staging / rel).stat().st_size,
                                      "sha256": sha256_file(staging / rel)})
            ck.read_checkpoint(staging / "model.pth")  # the copy, not just the source, must load
            self._write_docs(version, staging)
            os.replace(staging, final)
            state["versions"].append(version)
            state["next_id"] += 1
            self._save(state)  # last: until here the registry does not know vN
            saved = True
        except (OSError, ValueError) as exc:
            raise RegistryError(f"adding {checkpoint_path} as {vid} failed, registry unchanged: {exc}") from exc
        finally:
            if not saved:
                shutil.rmtree(staging, ignore_errors=True)
                shutil.rmtree(final, ignore_errors=True)
        return version

    def edit_bases(self, change: Callable[[dict], None]) -> None:
        """Apply `change` to the {name: entry} of imported bases and save, under the writer lock (source.hf_base).
        Nothing is written if `change` raises."""
        with self._writer():
            state = self.load()
            change(state["bases"])
            self._save(state)

    def set_metrics(self, ref: str, metrics: dict) -> Version:
        """Merge `metrics` into a version's metrics (evaluation results arrive one stage at a time)."""
        with self._writer():
            state = self.load()
            v = self._find(state, ref)
            v.metrics = {**v.metrics, **metrics}
            self._save(state)
            self._write_docs(v)
        return v

    def promote(self, ref: str, reason: str = "promoted by hand") -> Version:
        with self._writer():
            state = self.load()
            v = self._find(state, ref)
            state["champion"], state["champion_reason"] = v.id, reason
            self._save(state)
        return v

    def pick_champion(self) -> tuple[str | None, str]:
        """(id or None, reason) by CHAMPION_RULE. Applies nothing: `promote(id, reason)` does."""
        versions = self.versions()
        cands = [v for v in versions if any(v.metric(m) is not None for m in RANKED)]
        skipped = [v.id for v in versions if v not in cands]
        note = f" ({', '.join(skipped)}: none of {', '.join(RANKED)}, not considered)" if skipped else ""
        if not cands:
            return None, f"no version has {', '.join(RANKED)}; nothing to pick{note}"

        def key(v: Version) -> tuple:
            out: tuple = ()
            for m, best in RANKED.items():
                value = v.metric(m) or 0
                out += (v.metric(m) is None, value if best == "lowest" else -value)
            return out + (v.number,)

        ranked = sorted(cands, key=key)
        w, r = ranked[0], ranked[1] if len(ranked) > 1 else None
        if r is None:
            figures = ", ".join(f"{m} {_fmt(w.metric(m))}" for m in RANKED)
            return w.id, f"{w.id} is the only candidate ({figures})" + note
        ties: list[str] = []  # the metrics before the deciding one; w lacks one only when every candidate does
        for m, best in RANKED.items():
            if w.metric(m) is not None and w.metric(m) != r.metric(m):
                lead = "; ".join(ties) + ("; " if ties else "")
                return w.id, f"{lead}{w.id} has the {best} {m} {_fmt(w.metric(m))} (next: {r.id} with " \
                             f"{_fmt(r.metric(m))})" + note
            ties.append(f"{m} tie at {_fmt(w.metric(m))}" if w.metric(m) is not None else f"no version has {m}")
        return w.id, f"{w.id} and {r.id} tie on {', '.join(RANKED)}; the older version {w.id} is kept" + note

    def remove(self, ref: str, force: bool = False) -> Version:
        """Delete a version (the champion only with `force`); its number is never reused, children keep it as
        parent. The folder is renamed aside first, so a failed registry write can put it back."""
        with self._writer():
            state = self.load()
            v = self._find(state, ref)
            if v.id == state["champion"] and not force:
                raise RegistryError(f"{v.id} is the champion; promote another version first, or force the removal")
            folder = self.root / "versions" / v.id
            trash = folder.with_name(f".removing-{v.id}")
            if folder.exists():
                shutil.rmtree(trash, ignore_errors=True)
                os.replace(folder, trash)
            state["versions"] = [x for x in state["versions"] if x.id != v.id]
            if state["champion"] == v.id:  # forced: no champion until one is promoted or picked
                state["champion"] = state["champion_reason"] = None
            try:
                self._save(state)
            except BaseException:
                if trash.exists():
                    os.replace(trash, folder)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        return v

    def verify(self, ref: str) -> dict[str, str]:
        """{path: "ok" | problem} for every file of a version, re-hashed from disk."""
        report = {}
        for f in self.get(ref).files:
            p = self.root / f["path"]
            size = p.stat().st_size if p.is_file() else None
            report[f["path"]] = ("missing" if size is None else
                                 f"{size:,} bytes, registry says {f['bytes']:,}" if size != f["bytes"] else
                                 "sha256 differs from the registry" if sha256_file(p) != f["sha256"] else "ok")
        return report

    def diff(self, a: str, b: str) -> dict:
        """What changed from version a to b. config/training/fields: {key: (a, b)}; metrics: {key: (a, b, b - a
        or None)}; files, by path inside the version folder: {path: "added" | "removed" | "changed"}."""
        state = self.load()
        va, vb = self._find(state, a), self._find(state, b)
        metrics = {k: (x, y, round(_num(y) - _num(x), 10) if _num(x) is not None and _num(y) is not None else None)
                   for k, (x, y) in _changes(va.metrics, vb.metrics).items()}
        top = ("kind", "parent", "params", "tokenizer_sha256", "dataset_manifest_sha256", "notes")
        fa, fb = ({f["path"].split("/", 2)[-1]: f["sha256"] for f in v.files} for v in (va, vb))
        files = {p: "added" if p not in fa else "removed" if p not in fb else "changed"
                 for p in sorted(set(fa) | set(fb)) if fa.get(p) != fb.get(p)}
        return {"a": va.id, "b": vb.id, "config": _changes(va.config, vb.config), "metrics": metrics,
                "training": _changes(_flatten(va.training), _flatten(vb.training)),
                "fields": _changes({k: getattr(va, k) for k in top}, {k: getattr(vb, k) for k in top}), "files": files}


def _changes(x: dict, y: dict) -> dict:
    return {k: (x.get(k), y.get(k)) for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)}
