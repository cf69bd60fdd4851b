"""`builder export`: HF folder + ONNX (KV cache) + int8/q4 + retrieval index + manifest, behind gates."""

from __future__ import annotations

from pathlib import Path

import click


def gate_table(gates: list[dict]) -> str:
    mark = {True: "PASS", False: "FAIL", None: "info"}
    width = max(len(g["name"]) for g in gates)
    rows = [f"{'gate':<{width}}  result  value  (needs)"]
    for g in gates:
        status = mark[g["passed"]] if g["required"] or g["passed"] is None else f"{mark[g['passed']].lower()}*"
        rows.append(f"{g['name']:<{width}}  {status:<6}  {g['value']}  ({g['threshold']})")
    if any(not g["required"] and g["passed"] is not None for g in gates):
        rows.append("* reported against its target; does not stop the export")
    return "\n".join(rows)


@click.command("export")
@click.option("--model", "model_spec", default="champion", show_default=True,
              help="Registry version (v3, champion, latest) or a model.pth path.")
@click.option("--tokenizer", "tokenizer_dir", default=None, type=click.Path(path_type=Path),
              help="Tokenizer folder [default: the version's own, else runs/tokenizer].")
@click.option("--out", "out_dir", default=Path("dist/export"), show_default=True, type=click.Path(path_type=Path),
              help="Export folder (replaced only when every gate passes).")
@click.option("--q4", is_flag=True, help="Also write onnx/model_q4.onnx (4-bit MatMulNBits), reported, not gated.")
@click.option("--index", "index_path", default=Path("datasets/built/index"), show_default=True,
              type=click.Path(path_type=Path), help="Retrieval index to convert for the browser (skipped if missing).")
@click.option("--no-index", is_flag=True, help="Do not write the browser retrieval index.")
@click.option("--data", "data_dir", default=Path("datasets/built/default"), show_default=True,
              type=click.Path(path_type=Path), help="Corpus whose tokenized val split the bits/byte gate uses "
              "(falls back to the stdlib's pydoc topics when it has not been tokenized).")
@click.option("--root", default=Path("models"), show_default=True, type=click.Path(path_type=Path),
              help="Registry folder.")
@click.option("--graph", default="torch", show_default=True, type=click.Choice(["torch", "contrib"]),
              help="Graph of onnx/model.onnx + model_quantized.onnx: plain ops from torch.onnx.export (any "
                   "padding; transformers.js, optimum, the site) or onnxruntime contrib ops (GroupQueryAttention; "
                   "batch 1 / right padding).")
@click.option("--native/--no-native", default=True, show_default=True,
              help="Also write onnx/model_gqa_quantized.onnx (contrib graph, int8), the fastest file for "
                   "onnxruntime (supermix --backend onnx --dtype int8).")
@click.option("--gguf", is_flag=True, help="Also write gguf/ (f32, f16, q8_0 GGUF + an Ollama Modelfile, as "
              "`builder gguf` does), gated by reading every file back; not copied to the site.")
def export(model_spec: str, tokenizer_dir: Path | None, out_dir: Path, q4: bool, index_path: Path, no_index: bool,
           data_dir: Path, root: Path, graph: str, native: bool, gguf: bool) -> None:
    """Export a model for transformers, transformers.js, onnxruntime and optimum, and check it.

    \b
    Writes (the Hugging Face / transformers.js layout, docs/pages/export.md):
      config.json, generation_config.json, model.safetensors, tokenizer files
      onnx/model.onnx (fp32, KV cache), onnx/model_quantized.onnx (int8), onnx/model_q4.onnx (--q4),
      onnx/model_gqa_quantized.onnx (contrib-op graph, int8; --no-native skips it)
      index/ (the retrieval index, as the site serves it), manifest.json (files, sha256, gates, speed)
      gguf/model-{f32,f16,q8_0}.gguf + gguf/Modelfile (--gguf: llama.cpp, Ollama)
    Gates: ONNX fp32 greedy == PyTorch; int8 bits/byte within 1% and <= 30% of the bytes; the HF folder
    loads in transformers with the same logits; optimum's ORTModelForCausalLM generates our tokens.
    A version fine-tuned from an imported base (`builder sft --base`) keeps the base's architecture,
    tokenizer.json and chat template (docs/pages/own-base.md).

    \b
    Examples:
      builder export                       # the champion -> dist/export
      builder export --model v2 --out /tmp/v2 --q4
      builder export --graph contrib       # the contrib graph under the standard names
      builder export --gguf                # + GGUF files for llama.cpp / Ollama in dist/export/gguf
    """
    from builder.eval_cmd import registry_version
    from builder.export import export_model
    from builder.export_gates import GateError
    from runtime_python.backends import resolve_model
    from source.registry import Registry
    from source.token_data import default_token_dir
    from source.hf_tokenizer import load_tokenizer

    try:
        if tokenizer_dir is not None and Path(model_spec).exists():  # an explicit pair needs no registry
            pth = Path(model_spec) / "model.pth" if Path(model_spec).is_dir() else Path(model_spec)
            tok_dir = tokenizer_dir
        else:
            pth, version_tok = resolve_model(model_spec, root)
            tok_dir = tokenizer_dir or version_tok
        version = registry_version(pth, root)
        metrics = Registry(root).get(version).metrics if version else {}
        token_dir = default_token_dir(data_dir, load_tokenizer(tok_dir))
        index = None if no_index or not (index_path / "meta.json").is_file() else index_path
        if index is None and not no_index:
            click.echo(f"export: {index_path} not found, no retrieval index in the export (build it with `builder index build`)")
        manifest = export_model(pth, tok_dir, out_dir, index_path=index, q4=q4, token_dir=token_dir,
                                version=version, metrics=metrics, graph=graph, native=native, gguf=gguf,
                                log=click.echo)
    except (GateError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(gate_table(manifest["gates"]))
    speed = ", ".join(f"{k.removesuffix('_tok_s')} {v:,.0f}" for k, v in manifest["speed"].items())
    click.echo(f"decode tokens/s: {speed}")
    total = sum(f["bytes"] for f in manifest["files"])
    click.echo(f"export: {out_dir} ({len(manifest['files'])} files, {total / 1e6:.1f} MB)")
