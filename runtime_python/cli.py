"""`supermix`: chat with a trained model locally, in the terminal, in one shot, or over HTTP.

    supermix chat                 streaming terminal chat with /commands
    supermix ask "question"       one answer for scripts (--json for machines)
    supermix serve                web chat page + OpenAI-compatible /v1 API on 127.0.0.1

Design choices:
- The three verbs share one set of model options (`_model_options`) and one loader (`load_runtime`):
  the model defaults to the registry champion, the index to datasets/built/index; a missing
  index turns retrieval off with a one-line note instead of failing. A Hugging Face model folder
  (config.json, no .pth) runs on transformers (`runtime_python.hf_backend`) with its own chat template.
- Heavy imports (torch, FastAPI) happen inside the commands, so `supermix --help` stays instant.
- User mistakes (no champion, bad path, bad temperature) are `click.ClickException`s: one line, no
  traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click

DEFAULT_INDEX = Path("datasets/built/index")
DEFAULT_EXPORT = Path("dist/export")


@dataclass
class Runtime:
    backend: Any  # a ChatBackend: TorchBackend, OnnxBackend or HFBackend
    index: Any  # source.retrieval.Index | None
    note: str | None  # for the user, one line per note, e.g. why retrieval is off


def load_runtime(model: str | None, tokenizer: Path | None, index_path: Path | None, no_retrieval: bool,
                 device: str = "cpu", dtype: str = "fp32", backend_kind: str = "auto",
                 batched: bool = False) -> Runtime:
    """Resolve and load the model and (unless disabled) the retrieval index; ClickException on errors.
    `batched` (the server): "auto" keeps TorchBackend, whose forward batches many requests."""
    from runtime_python.hf_backend import is_hf_folder

    notes = []
    try:
        if backend_kind == "onnx" and _is_export(model):
            backend = _export_backend(model, device, dtype)
        elif model is not None and is_hf_folder(model):
            backend = _hf_backend(model, tokenizer, device, dtype)
        else:
            backend, note = _pth_backend(model, tokenizer, device, dtype, backend_kind, batched)
            notes += [note] if note else []
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        raise click.ClickException(str(e).strip("'\"")) from None
    index = None
    if not no_retrieval:
        path = index_path or DEFAULT_INDEX
        if path.exists():
            from source.retrieval import Index
            try:
                index = Index(path)
            except ValueError as e:
                raise click.ClickException(str(e)) from None
        elif index_path is not None:  # asked for explicitly: a typo should not pass silently
            raise click.ClickException(f"retrieval index {path} not found: build one with `builder index build`")
        else:
            notes.append(f"note: no retrieval index at {path}; answering without sources (`builder index build`)")
    return Runtime(backend, index, "\n".join(notes) or None)


def _is_export(model: str | None) -> bool:
    """Whether `--backend onnx --model X` names an export folder (the default one when X is not given)."""
    return model is None or (Path(model) / "config.json").is_file()


def _pth_backend(model: str | None, tokenizer: Path | None, device: str, dtype: str, kind: str,
                 batched: bool) -> tuple[Any, str | None]:
    """A `.pth` (registry version or path) as TorchBackend or as OnnxBackend's in-memory GroupQueryAttention
    graph: "onnx", or "auto" for fp32 on the CPU outside the server (the fastest exact path; torch when
    onnxruntime is missing, with a note)."""
    from runtime_python.backends import TorchBackend, load_checkpoint, pick_device, resolve_model

    dev = pick_device(device)
    if kind == "onnx" and (dtype != "fp32" or dev.type != "cpu"):
        raise ValueError(f"--backend onnx runs a .pth in fp32 on the CPU (asked: {dtype} on {dev.type}); int8 ONNX "
                         f"is an export folder's file (--model {DEFAULT_EXPORT})")
    weights, tok, name = load_checkpoint(*resolve_model(model, tokenizer_dir=tokenizer), dev)
    note = None
    if kind == "onnx" or (kind == "auto" and not batched and dtype == "fp32" and dev.type == "cpu"):
        try:
            from runtime_python.onnx_backend import OnnxBackend
            from source.onnx_graph import fits

            if kind == "onnx" or fits(weights.cfg):
                return OnnxBackend.from_model(weights, tok, name), None
        except ImportError as e:
            if kind == "onnx":
                raise ValueError(f"--backend onnx needs {e.name}: pip install onnxruntime onnx") from None
            note = f"note: {e.name} is not installed; running the model with torch (exact, slower)"
    return TorchBackend(weights, tok, name=name, dtype=dtype), note


def _export_backend(model: str | None, device: str, dtype: str):
    """An OnnxBackend over an export folder (`builder export`); fp32 or int8 (the q8 file)."""
    from runtime_python.onnx_backend import ONNX_FILES, OnnxBackend

    if device not in ("cpu", "auto"):
        raise ValueError(f"--backend onnx runs on the CPU (onnxruntime CPUExecutionProvider), not {device!r}")
    if dtype == "bf16":
        raise ValueError("--backend onnx has fp32 (onnx/model.onnx) and int8 (onnx/model_quantized.onnx), not bf16")
    folder = Path(model) if model else DEFAULT_EXPORT
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not an export folder (no config.json): run `builder export --out "
                                f"{folder}` or pass --model EXPORT_DIR")
    if dtype == "int8":
        return OnnxBackend(folder, "q8-gqa" if (folder / "onnx" / ONNX_FILES["q8-gqa"]).is_file() else "q8")
    return OnnxBackend(folder, "fp32")


def _hf_backend(model: str, tokenizer: Path | None, device: str, dtype: str):
    """An HFBackend over a Hugging Face model folder (transformers, its own tokenizer and chat template)."""
    from runtime_python.backends import pick_device
    from runtime_python.hf_backend import HFBackend

    if tokenizer is not None:
        raise ValueError(f"--tokenizer is for a .pth model; {model} is a Hugging Face folder with its own tokenizer.json")
    return HFBackend(model, device=pick_device(device), dtype=dtype)


def generation_config(temperature: float | None, max_tokens: int | None, **extra: Any):
    """A validated GenerationConfig from CLI options (None keeps the default)."""
    from runtime_python.generation import GenerationConfig

    kw = {k: v for k, v in dict(temperature=temperature, max_new_tokens=max_tokens, **extra).items() if v is not None}
    try:
        return GenerationConfig(**kw).validate()
    except ValueError as e:
        raise click.ClickException(str(e)) from None


def _model_options(f: Callable) -> Callable:
    options = [
        click.option("--model", "-m", default=None, metavar="VERSION|PATH",
                     help="Registry version (v3, champion, latest), a model.pth, or a Hugging Face model folder "
                          "(config.json + safetensors + tokenizer.json) [default: the champion]."),
        click.option("--tokenizer", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Tokenizer folder, for a model.pth outside the registry."),
        click.option("--index", "index_path", type=click.Path(path_type=Path), default=None,
                     help=f"Retrieval index [default: {DEFAULT_INDEX} when it exists]."),
        click.option("--no-retrieval", is_flag=True, help="Answer without looking anything up."),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, mps or auto."),
        click.option("--dtype", type=click.Choice(["fp32", "bf16", "int8"]), default="fp32", show_default=True,
                     help="Weights: fp32 (exact), bf16, int8 (CPU only, weight-only)."),
        click.option("--backend", "backend_kind", type=click.Choice(["auto", "torch", "onnx"]), default="auto",
                     show_default=True, help="auto: a .pth in fp32 on the CPU runs in onnxruntime (exact, the fastest; "
                     "serve keeps torch, which batches), anything else in torch. torch: PyTorch. onnx: onnxruntime, "
                     f"on a .pth or an export folder (--model DIR, default {DEFAULT_EXPORT})."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _generation_options(f: Callable) -> Callable:
    f = click.option("--max-tokens", type=click.IntRange(min=1), default=None,
                     help="Longest reply in tokens [default: 256].")(f)
    return click.option("--temperature", "-t", type=float, default=None,
                        help="Sampling temperature; 0 = greedy [default: 0.7].")(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="supermix")
def main() -> None:
    """Supermix runtime: chat with a trained model locally.

    \b
    Examples:
      supermix chat                                 # the registry champion, retrieval on
      supermix chat --model v2 --temperature 0
      supermix ask "What does json.dumps do?" --json
      supermix serve --port 8000                    # http://127.0.0.1:8000 and /v1
    """


@main.command()
@_model_options
@_generation_options
def chat(model: str | None, tokenizer: Path | None, index_path: Path | None, no_retrieval: bool, device: str,
         dtype: str, backend_kind: str, temperature: float | None, max_tokens: int | None) -> None:
    """Chat in the terminal: streamed replies, citations, /commands (type /help).

    \b
    Examples:
      supermix chat
      supermix chat --model runs/sft-tiny/model.pth --tokenizer runs/tokenizer --no-retrieval
      supermix chat --backend torch                 # PyTorch instead of onnxruntime
      supermix chat --backend onnx --model dist/export --dtype int8
      supermix chat --model ~/models/SmolLM2-135M-Instruct --no-retrieval
    Ctrl-C stops a reply; Ctrl-C or Ctrl-D at the prompt leaves.
    """
    from runtime_python.terminal import run_chat

    gen = generation_config(temperature, max_tokens)
    rt = load_runtime(model, tokenizer, index_path, no_retrieval, device, dtype, backend_kind)
    if rt.note:
        click.echo(click.style(rt.note, dim=True), err=True)
    run_chat(rt.backend, rt.index, gen)


@main.command()
@click.argument("question")
@_model_options
@_generation_options
@click.option("--json", "as_json", is_flag=True,
              help='Print {"answer", "citations", "model", "tokens_per_second"} as JSON.')
def ask(question: str, model: str | None, tokenizer: Path | None, index_path: Path | None, no_retrieval: bool,
        device: str, dtype: str, backend_kind: str, temperature: float | None, max_tokens: int | None,
        as_json: bool) -> None:
    """Answer one question and exit (for scripts).

    \b
    Examples:
      supermix ask "What is a closure?"
      supermix ask "What does json.dumps do?" --json --temperature 0 | jq .answer
    """
    from runtime_python.terminal import ask_once

    gen = generation_config(temperature, max_tokens)
    rt = load_runtime(model, tokenizer, index_path, no_retrieval, device, dtype, backend_kind)
    if rt.note and not as_json:
        click.echo(click.style(rt.note, dim=True), err=True)
    ask_once(rt.backend, rt.index, gen, question, as_json=as_json)


def check_exposure(host: str, api_key: str | None, insecure_no_auth: bool) -> None:
    """Refuse to serve beyond this machine without a key (ClickException), unless told to."""
    from runtime_python.guard import is_loopback

    if is_loopback(host) or api_key or insecure_no_auth:
        return
    raise click.ClickException(
        f"refusing to serve on {host} without an API key: anyone who can reach this address could use the model. "
        "Pass --api-key KEY (or set SUPERMIX_API_KEY), or --insecure-no-auth if the network is yours alone.")


@main.command()
@_model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; a non-loopback one (0.0.0.0) needs --api-key or --insecure-no-auth.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-queue", type=click.IntRange(min=0), default=16, show_default=True,
              help="Requests that may wait for a free slot; more get HTTP 503 with Retry-After.")
@click.option("--slots", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Requests generated at once, batched into one forward pass per step (--backend torch).")
@click.option("--no-prompt-cache", is_flag=True,
              help="Compute every prompt in full instead of reusing cached prefixes (for measuring).")
@click.option("--api-key", envvar="SUPERMIX_API_KEY", default=None, metavar="KEY",
              help="Require 'Authorization: Bearer KEY' on /v1 (env: SUPERMIX_API_KEY); the page asks for it.")
@click.option("--insecure-no-auth", is_flag=True, help="Serve a non-loopback --host without an API key.")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="Also accept this Host header name (repeatable; '*' = any). Loopback names, the bound "
                   "address and IP addresses are always accepted.")
@click.option("--allow-origin", "allow_origins", multiple=True, metavar="ORIGIN",
              help="Allow cross-origin browser calls (CORS) from this origin, e.g. https://app.example "
                   "(repeatable). Default: same-origin only.")
@click.option("--max-tokens-limit", type=click.IntRange(min=1), default=None,
              help="Largest max_tokens a request may ask for [default: the model's context].")
@click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="Stop a request (HTTP 504) that runs longer than this, queueing included [default: none].")
def serve(model: str | None, tokenizer: Path | None, index_path: Path | None, no_retrieval: bool, device: str,
          dtype: str, backend_kind: str, host: str, port: int, max_queue: int, api_key: str | None,
          insecure_no_auth: bool, allow_hosts: tuple[str, ...], allow_origins: tuple[str, ...],
          max_tokens_limit: int | None, request_timeout: float | None, slots: int,
          no_prompt_cache: bool) -> None:
    """Serve the web chat page and an OpenAI-compatible API (/v1/chat/completions, /v1/completions).

    \b
    Examples:
      supermix serve                                # http://127.0.0.1:8000
      supermix serve --port 9000 --model v2
      SUPERMIX_API_KEY=s3cret supermix serve --host 0.0.0.0
      supermix serve --slots 16 --max-queue 64      # 16 chats at once, 64 more may wait
    \b
    Any OpenAI client works:
      OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    """
    from runtime_python.server import create_app, run_server

    check_exposure(host, api_key, insecure_no_auth)  # before the slow model load
    rt = load_runtime(model, tokenizer, index_path, no_retrieval, device, dtype, backend_kind, batched=True)
    if rt.note:
        click.echo(rt.note, err=True)
    app = create_app(rt.backend, rt.index, max_queue=max_queue, host=host, api_key=api_key,
                     allow_hosts=allow_hosts, allow_origins=allow_origins, max_tokens_limit=max_tokens_limit,
                     request_timeout=request_timeout, models_root=Path("models"),
                     slots=slots, prompt_cache=not no_prompt_cache)
    auth = "API key required" if api_key else "no API key"
    click.echo(f"supermix: serving {rt.backend.name} on http://{host}:{port}  (API: http://{host}:{port}/v1, {auth})")
    run_server(app, host, port)


if __name__ == "__main__":
    main()
