"""`builder eval`: the held-out report (bits-per-byte, grounded QA, refusals, samples) and/or the natural
questions scored through the shipped paths (torch, onnx, site) -> JSON report + markdown tables."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from builder.site import SITE_DTYPE, SITE_DTYPES

HELD_OUT_LIMIT = 200


def registry_version(model_path: Path, root: Path) -> str | None:
    """The registry version a resolved model.pth belongs to (models/versions/vN/model.pth), if any."""
    folder = model_path.resolve().parent
    return folder.name if folder.parent == (root / "versions").resolve() else None


def held_out_report(model_spec: str | None, tokenizer_dir: Path | None, data_dir: Path, sft_dir: Path,
                    index_path: Path, limit: int, root: Path) -> tuple[dict, Path, str | None]:
    """(report, model.pth, registry version): bits-per-byte, grounded QA + refusals on the SFT test
    split (template questions about held-out entities), fixed samples."""
    from runtime_python.backends import resolve_model
    from source.checkpoint import load_model
    from source.evaluate import bits_per_byte, grounded_qa, sample_conversations
    from source.sft_batches import read_jsonl
    from source.token_data import build_token_shards, default_token_dir
    from source.hf_tokenizer import load_tokenizer

    try:
        pth, tokenizer_dir = resolve_model(model_spec, root, tokenizer_dir)
        version_id = registry_version(pth, root)
        tok = load_tokenizer(tokenizer_dir)  # ours, or an imported base's (a version fine-tuned from one)
        model, ckpt = load_model(pth)
        if ckpt["tokenizer"] != tok.sha256:
            raise ValueError(f"{pth} was trained with tokenizer {ckpt['tokenizer'][:12]}, not {tok.sha256[:12]}")
        token_dir = default_token_dir(data_dir, tok)
        build_token_shards(data_dir, tok, token_dir)
        test_path = sft_dir / "test.jsonl"
        examples = read_jsonl(test_path) if test_path.is_file() else []
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise click.ClickException(str(exc)) from None
    t0 = time.time()
    report = {"model": str(pth), "version": version_id, "kind": ckpt.get("kind"), "step": ckpt.get("step")}
    report.update(bits_per_byte(model, token_dir, seq_len=min(256, model.cfg.max_seq_len)))
    if examples:
        report.update(grounded_qa(model, tok, examples, limit=limit))
    else:
        click.echo(f"note: {test_path} not found; grounded QA skipped (run `builder sft-data`)", err=True)
    index = None
    if (index_path / "meta.json").is_file():
        from source.retrieval import Index

        index = Index(index_path)
    report["samples"] = sample_conversations(model, tok, index)
    report["seconds"] = round(time.time() - t0, 1)
    return report, pth, version_id


def print_held_out(report: dict) -> None:
    rows = [("val bits/byte", report["val_bpb"]), ("val loss", report["val_loss"])]
    for key in ("grounded_qa", "fact_recall_pass", "citation_accuracy", "refusal_accuracy"):
        if report.get(key) is not None:
            rows.append((key, report[key]))
    click.echo("\n| metric | value |\n|---|---:|")
    for name, value in rows:
        click.echo(f"| {name} | {value:.4f} |")
    for s in report["samples"]:
        click.echo(f"\nQ: {s['prompt']}\nA: {s['answer']}\n   sources: {', '.join(s['sources']) or '-'}")


@click.command("eval")
@click.option("--model", "model_spec", default=None,
              help="A model.pth path or a registry version (v3, champion) [default: the champion].")
@click.option("--tokenizer", "tokenizer_dir", default=None, type=click.Path(path_type=Path),
              help="Tokenizer folder [default: the version's own, else runs/tokenizer].")
@click.option("--data", "data_dir", default="datasets/built/default", show_default=True, type=click.Path(path_type=Path),
              help="Corpus folder (its val split gives bits-per-byte).")
@click.option("--sft-data", "sft_dir", default="datasets/built/sft", show_default=True, type=click.Path(path_type=Path),
              help="SFT folder whose test.jsonl gives the grounded-QA and refusal items.")
@click.option("--index", "index_path", default="datasets/built/index", show_default=True,
              type=click.Path(path_type=Path), help="Retrieval index (samples; natural questions via torch).")
@click.option("--questions", type=click.Path(path_type=Path), default=None,
              help="Natural questions (datasets/eval/README.md) to score through the --via paths.")
@click.option("--via", default="torch", show_default=True,
              help="With --questions: paths to run, comma-separated: torch (the .pth, as `supermix ask -t 0`), "
                   "onnx (--export, the file --dtype names), site (--site in headless Chromium).")
@click.option("--export", "export_dir", default="dist/export", show_default=True, type=click.Path(path_type=Path),
              help="Export folder for --via onnx.")
@click.option("--site", "site_dir", default="dist/pages", show_default=True, type=click.Path(path_type=Path),
              help="Built site folder for --via site.")
@click.option("--dtype", type=click.Choice(list(SITE_DTYPES)), default=SITE_DTYPE, show_default=True,
              help="ONNX file for --via onnx and site [default: the one the site ships].")
@click.option("--held-out/--no-held-out", "held_out", default=None,
              help="Also run the template held-out report [default: only without --questions].")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help=f"Score only the first N items (held-out grounded QA: default {HELD_OUT_LIMIT}; "
                   "natural questions: default all).")
@click.option("--sample", type=click.IntRange(min=1), default=None,
              help="Score a random sample of N natural questions (seeded by --seed), for a quick re-check.")
@click.option("--seed", default=0, show_default=True, help="Seed of --sample.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="Longest reply for the natural questions [default: the runtime's, 256].")
@click.option("--out", "out_path", default=None, type=click.Path(path_type=Path),
              help="Report file [default: eval.json next to the model; eval-natural.json there (or in runs/) "
                   "for natural questions alone].")
@click.option("--root", default="models", show_default=True, type=click.Path(path_type=Path), help="Registry folder.")
@click.option("--record/--no-record", default=True, show_default=True,
              help="Store the held-out metrics in the registry when --model is a registry version.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def eval_(model_spec: str | None, tokenizer_dir: Path | None, data_dir: Path, sft_dir: Path, index_path: Path,
          questions: Path | None, via: str, export_dir: Path, site_dir: Path, dtype: str,
          held_out: bool | None, limit: int | None, sample: int | None, seed: int, max_new_tokens: int | None,
          out_path: Path | None, root: Path, record: bool, quiet: bool) -> None:
    """Evaluate a model and write a JSON report (and markdown tables).

    Without --questions: bits-per-byte, grounded QA and refusals on the held-out template items, and
    fixed samples. With --questions: each hand-written question answered greedily through the paths
    users run, scored for correct facts + gold citation, refusals, retrieval hit and copy fidelity
    (definitions: source/natural_eval.py), per kind and overall; with several paths, how often they
    give the identical reply.

    \b
    Examples:
      builder eval --model runs/sft-tiny/model.pth
      builder eval --model champion --limit 100
      builder eval --questions datasets/eval/natural.jsonl --via torch,onnx,site
      builder eval --questions datasets/eval/natural.jsonl --via site --site dist/pages --sample 50
    """
    from source.files import atomic_write_bytes

    if questions is None and sample is not None:
        raise click.ClickException("--sample needs --questions")
    run_held_out = held_out if held_out is not None else questions is None
    if not run_held_out and questions is None:
        raise click.ClickException("nothing to do: --no-held-out without --questions")
    natural = None
    if questions is not None:
        from builder.natural_eval import EvalSetupError, evaluate_natural, parse_via
        from source.natural_eval import ItemError

        try:
            natural = evaluate_natural(questions, parse_via(via), model_spec=model_spec, root=root,
                                       tokenizer_dir=tokenizer_dir, index_path=index_path, export_dir=export_dir,
                                       site_dir=site_dir, limit=limit, sample=sample,
                                       seed=seed, max_new_tokens=max_new_tokens, progress=not quiet, dtype=dtype)
        except (ItemError, EvalSetupError) as e:
            raise click.ClickException(str(e)) from None
    report, version_id = {}, None
    if run_held_out:
        report, pth, version_id = held_out_report(model_spec, tokenizer_dir, data_dir, sft_dir, index_path,
                                                  limit or HELD_OUT_LIMIT, root)
        out_path = out_path or pth.with_name("eval.json")
    if natural is not None:
        report["natural"] = natural
        if out_path is None:
            torch_run = natural["paths"].get("torch")
            out_path = Path(torch_run["model"]).with_name("eval-natural.json") if torch_run else \
                Path("runs") / "eval-natural.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_path, json.dumps(report, indent=2, ensure_ascii=False).encode())

    if run_held_out:
        print_held_out(report)
    if natural is not None:
        from builder.natural_eval import markdown

        click.echo(markdown(natural, report if run_held_out else None))
    click.echo(f"\nreport: {out_path}")
    if version_id and record and run_held_out:
        from source.registry import Registry

        metrics = {k: report[k] for k in ("val_bpb", "val_loss", "grounded_qa", "citation_accuracy",
                                          "fact_recall_pass", "refusal_accuracy") if report.get(k) is not None}
        Registry(root).set_metrics(version_id, metrics)
        click.echo(f"metrics recorded for {version_id}")
    if natural is not None and record and sample is None and limit is None:  # a re-check or a slice ranks nothing
        record_natural(natural, model_spec, root, tokenizer_dir)


def record_natural(natural: dict, model_spec: str | None, root: Path, tokenizer_dir: Path | None) -> None:
    """A registry version's whole-set natural figures go into its metrics (`natural_site_correct` ranks
    champions: source.registry.CHAMPION_RULE); a sample or a model outside the registry records nothing."""
    from runtime_python.backends import resolve_model
    from source.registry import Registry

    version_id = registry_version(resolve_model(model_spec, root, tokenizer_dir)[0], root)
    if version_id:
        metrics = {}
        for path, run in natural["paths"].items():
            overall = run["metrics"]["overall"]
            metrics |= {f"natural_{path}_correct": overall["correct"],
                        f"natural_{path}_refusal_on_no_answer": overall["refusal_on_no_answer"]}
        Registry(root).set_metrics(version_id, metrics)
        click.echo(f"natural figures recorded for {version_id}")
