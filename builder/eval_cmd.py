"""`builder eval`: bits-per-byte, grounded QA + citations, refusals and fixed samples -> JSON report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click


def registry_version(model_path: Path, root: Path) -> str | None:
    """The registry version a resolved model.pth belongs to (models/versions/vN/model.pth), if any."""
    folder = model_path.resolve().parent
    return folder.name if folder.parent == (root / "versions").resolve() else None


@click.command("eval")
@click.option("--model", "model_spec", required=True, help="A model.pth path or a registry version (v3, champion).")
@click.option("--tokenizer", "tokenizer_dir", default=None, type=click.Path(path_type=Path),
              help="Tokenizer folder [default: the version's own, else runs/tokenizer].")
@click.option("--data", "data_dir", default="datasets/built/default", show_default=True, type=click.Path(path_type=Path),
              help="Corpus folder (its val split gives bits-per-byte).")
@click.option("--sft-data", "sft_dir", default="datasets/built/sft", show_default=True, type=click.Path(path_type=Path),
              help="SFT folder whose test.jsonl gives the grounded-QA and refusal items.")
@click.option("--index", "index_path", default="datasets/built/index", show_default=True,
              type=click.Path(path_type=Path), help="Retrieval index for the sample conversations.")
@click.option("--limit", default=200, show_default=True, help="Grounded-QA items to score.")
@click.option("--out", "out_path", default=None, type=click.Path(path_type=Path),
              help="Report file [default: next to the model, eval.json].")
@click.option("--root", default="models", show_default=True, type=click.Path(path_type=Path), help="Registry folder.")
@click.option("--record/--no-record", default=True, show_default=True,
              help="Store the metrics in the registry when --model is a registry version.")
def eval_(model_spec: str, tokenizer_dir: Path | None, data_dir: Path, sft_dir: Path, index_path: Path, limit: int,
          out_path: Path | None, root: Path, record: bool) -> None:
    """Evaluate a model and write a JSON report (and a short table).

    \b
    Examples:
      builder eval --model runs/sft-tiny/model.pth
      builder eval --model champion --limit 100
    """
    from runtime_python.backends import resolve_model
    from source.checkpoint import load_model
    from source.files import atomic_write_bytes
    from source.evaluate import bits_per_byte, grounded_qa, sample_conversations
    from source.sft_batches import read_jsonl
    from source.token_data import build_token_shards, default_token_dir
    from source.tokenizer import Tokenizer

    try:
        pth, tokenizer_dir = resolve_model(model_spec, root, tokenizer_dir)
        version_id = registry_version(pth, root)
        tok = Tokenizer.load(tokenizer_dir)
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
    if index_path.is_file():
        from source.retrieval import Index

        index = Index(index_path)
    report["samples"] = sample_conversations(model, tok, index)
    report["seconds"] = round(time.time() - t0, 1)
    out_path = out_path or pth.with_name("eval.json")
    atomic_write_bytes(out_path, json.dumps(report, indent=2, ensure_ascii=False).encode())

    rows = [("val bits/byte", report["val_bpb"]), ("val loss", report["val_loss"])]
    for key in ("grounded_qa", "fact_recall_pass", "citation_accuracy", "refusal_accuracy"):
        if report.get(key) is not None:
            rows.append((key, report[key]))
    click.echo("\n| metric | value |\n|---|---:|")
    for name, value in rows:
        click.echo(f"| {name} | {value:.4f} |")
    for s in report["samples"]:
        click.echo(f"\nQ: {s['prompt']}\nA: {s['answer']}\n   sources: {', '.join(s['sources']) or '-'}")
    click.echo(f"\nreport: {out_path}")
    if version_id and record:
        from source.registry import Registry

        metrics = {k: report[k] for k in ("val_bpb", "val_loss", "grounded_qa", "citation_accuracy",
                                          "fact_recall_pass", "refusal_accuracy") if report.get(k) is not None}
        Registry(root).set_metrics(version_id, metrics)
        click.echo(f"metrics recorded for {version_id}")
