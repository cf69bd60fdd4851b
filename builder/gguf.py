"""GGUF export for llama.cpp and Ollama: a checkpoint + its SentencePiece tokenizer -> model-{f32,f16,q8_0}.gguf
with the tokenizer and chat template in the metadata, plus an Ollama Modelfile.

Design choices (docs/pages/export.md and docs/pages/decisions.md give the reasons):
- Written with the `gguf` package's own `GGUFWriter` (the library llama.cpp's converter uses), tensor names
  from its `TensorNameMap` (HF names -> `blk.N.attn_q`, ...), Q8_0 from its `quants` module. No hand-packed
  bytes: the key names, alignment and type codes stay whatever the pinned package writes.
- general.architecture "llama". llama.cpp's llama graph applies RoPE to adjacent pairs (x0, x1), (x2, x3),
  ...; our weights (HF layout) rotate halves (x_i with x_{i + d/2}). So the rows of q_proj and k_proj are
  permuted within each head, exactly as llama.cpp's converter does for HF Llama checkpoints
  (`permute_qk`; `unpermute_qk` is its inverse, used by the read-back check). v_proj and o_proj are untouched.
- Tied embeddings: no `output.weight`; llama.cpp then reads the output projection from `token_embd`.
- f16 and q8_0 convert the 2-D weights only; norms stay f32 (as llama.cpp's converter does). q8_0 falls
  back to f16 for a tensor whose rows are not a multiple of its 32-value block.
- Tokenizer: tokenizer.ggml.model "llama" (SentencePiece), every piece with its score (sentencepiece BPE
  merges the highest-scoring pair first, and so does llama.cpp's "llama" tokenizer) and type: byte
  pieces BYTE, <unk> UNKNOWN, and <s> </s> plus our chat tokens CONTROL (they are `special` in
  tokenizer_config.json: matched in text only when the caller parses special tokens, never printed).
  add_bos true (every prompt of ours starts with <s>), add_space_prefix true (sentencepiece's dummy
  prefix; llama.cpp also adds it after each special token, as our `Tokenizer.encode` does), eot = <|end|>
  so llama.cpp ends a reply where ours does, pad = eos (as generation_config.json).
- tokenizer.chat_template renders `source.prompt.build_prompt`'s layout without retrieval: one system turn
  (the messages' system texts joined by a blank line, else our default system prompt), the turns in order,
  special-token spellings defused, then <|assistant|>. A `context` message (numbered sources) is
  rendered where it is given. What a Jinja template cannot do: strip "[n]" markers from earlier replies
  (our runtime does), trim to the window.
- The Ollama Modelfile uses Go template syntax: Ollama adds <s> itself (add_bos), so the template starts at
  the system turn; SYSTEM carries our default system prompt. Go templates have no string replace, so
  Ollama does not defuse special-token spellings.
- A version fine-tuned from an imported base keeps its architecture and tokenizer: general.architecture "qwen2"
  for a Qwen2 model (q/k/v biases; llama.cpp's qwen2 graph rotates halves, as HF does, so q/k are not permuted),
  "llama" otherwise (biases permuted like their rows), `output.weight` when the head is untied, rope scaling
  "linear" as its type and factor, "llama3" as the per-frequency `rope_freqs` tensor llama.cpp's converter
  writes; the byte-level BPE tokenizer and the model's own chat template as builder/gguf_bpe.py writes them.
  Its Modelfile has no TEMPLATE (Ollama takes the GGUF's chat template) and stops at its special tokens.
- Atomic: the files go to a sibling `.partial` folder renamed into place at the end (`export_gguf`), or
  into the caller's partial folder (`builder export --gguf`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from source.files import replace_dir
from source.hf_tokenizer import HFTokenizer, load_tokenizer
from source.model import Transformer, hf_state_dict, rope_inv_freq
from source.sft_data import DEFAULT_SYSTEM_PROMPT
from source.tokenizer import CHAT_ROLES, SPECIAL_TOKENS, ChatTokenizer, Tokenizer

DTYPES = ("f32", "f16", "q8_0")
DEFAULT_DTYPES = DTYPES
MODELFILE_WEIGHTS = "model-f32.gguf"  # exact and small (32 MB for the champion); q8_0 is the small choice
DEFUSED = "\u2039"  # what source.tokenizer.defuse_special_tokens puts in place of a spelling's "<"


def gguf_name(dtype: str) -> str:
    return f"model-{dtype}.gguf"


# -----------------------------------------------------------------------------
# weights

def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half rows of one projection (heads * head_dim, dim) -> llama.cpp's adjacent-pair order:
    within each head, row j of the first half and row j of the second half become rows 2j and 2j + 1."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `permute_qk`."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_arch(cfg) -> str:
    """llama.cpp's architecture: "qwen2" for q/k/v biases without an o_proj bias (as `hf_config_dict`), else llama."""
    if cfg.mlp_bias:
        raise ValueError("GGUF export does not take MLP biases (llama.cpp's llama graph has none)")
    return "qwen2" if cfg.qkv_bias and not cfg.o_bias else "llama"


def gguf_tensors(model: Transformer) -> dict[str, tuple[np.ndarray, str]]:
    """GGUF tensor name -> (fp32 array in llama.cpp's layout, HF name), tied lm_head left out."""
    import gguf

    cfg = model.cfg
    arch = gguf_arch(cfg)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.QWEN2 if arch == "qwen2" else gguf.MODEL_ARCH.LLAMA, cfg.n_layers)
    out = {}
    for hf_name, t in hf_state_dict(model).items():
        if hf_name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # llama.cpp uses token_embd when output.weight is absent
        w = t.detach().to(torch.float32).cpu().numpy()
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            w = permute_qk(w, cfg.n_heads)
        elif arch == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            w = permute_qk(w, cfg.n_kv_heads)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"{hf_name}: no GGUF tensor name for it in gguf's {arch} map")
        out[name] = (np.ascontiguousarray(w), hf_name)
    if cfg.rope_scaling == "llama3":  # llama.cpp divides each frequency by its factor
        from dataclasses import replace

        factors = rope_inv_freq(replace(cfg, rope_scaling="none")) / rope_inv_freq(cfg)
        out["rope_freqs.weight"] = (factors.to(torch.float32).numpy(), "rope_scaling (llama3)")
    return out


def _encode_tensor(w: np.ndarray, dtype: str):
    """(array, raw_dtype) for GGUFWriter.add_tensor: 1-D stays f32, 2-D becomes `dtype`."""
    import gguf

    if w.ndim == 1 or dtype == "f32":
        return w, None
    if dtype == "q8_0" and w.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return w.astype(np.float16), None


# -----------------------------------------------------------------------------
# tokenizer and chat template

def _defused(expr: str) -> str:
    """A Jinja expression with every special-token spelling's "<" replaced, like defuse_special_tokens.
    Spellings never overlap (each holds one "<", its first character), so replacing them one after
    another equals the regular expression's single pass."""
    return f"({expr})" + "".join(f"|replace('{t}', '{DEFUSED}{t[1:]}')" for t in SPECIAL_TOKENS)


def _jinja_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def chat_template(system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """The Jinja chat template (HF variables: messages, bos_token, add_generation_prompt) that renders
    build_prompt's layout; one line, so trim_blocks/lstrip_blocks do not change it."""
    system = f"ns.system if ns.system is not none else {_jinja_string(system_prompt)}"
    roles = ", ".join(f"'{r}'" for r in CHAT_ROLES)
    return (
        "{{ bos_token }}"
        "{% set ns = namespace(system=none) %}"
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{% set ns.system = message['content'] if ns.system is none else ns.system + '\\n\\n' + message['content'] %}"
        "{% endif %}{% endfor %}"
        "{{ '<|system|>' + " + _defused(system) + " + '<|end|>' }}"
        "{% for message in messages %}"
        "{% if message['role'] not in [" + roles + "] %}"
        "{{ raise_exception('Unknown role: ' + message['role']) }}"
        "{% elif message['role'] != 'system' %}"
        "{{ '<|' + message['role'] + '|>' + " + _defused("message['content']") + " + '<|end|>' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )


def token_types(tokenizer: Tokenizer) -> list[int]:
    import gguf

    sp, special = tokenizer.sp, set(SPECIAL_TOKENS)
    types = []
    for i in range(tokenizer.vocab_size):
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i) or sp.id_to_piece(i) in special:
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return [int(t) for t in types]


# -----------------------------------------------------------------------------
# files

def write_gguf(model: Transformer, tokenizer: ChatTokenizer, path: Path, dtype: str = "f32", name: str = "supermix",
               generation: dict | None = None, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> None:
    """One GGUF file: hyper-parameters, tokenizer, chat template, sampling defaults, weights as `dtype`."""
    import gguf

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cfg = model.cfg
    if isinstance(tokenizer, Tokenizer) and tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces, the model's vocab_size is {cfg.vocab_size}")
    w = gguf.GGUFWriter(str(path), gguf_arch(cfg))
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    w.add_name(name)
    w.add_file_type(file_type)
    if dtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_hidden)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.rope_scaling == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_factor)
    if isinstance(tokenizer, HFTokenizer):
        from builder.gguf_bpe import add_bpe_tokenizer

        add_bpe_tokenizer(w, tokenizer, cfg.vocab_size)
    else:
        _add_sentencepiece(w, tokenizer, system_prompt)
    if generation:
        w.add_sampling_temp(float(generation["temperature"]))
        w.add_sampling_top_p(float(generation["top_p"]))
    for tname, (arr, _) in gguf_tensors(model).items():
        data, raw = _encode_tensor(arr, dtype)
        w.add_tensor(tname, data, raw_dtype=raw)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


def _add_sentencepiece(w, tokenizer: Tokenizer, system_prompt: str) -> None:
    """Our tokenizer as llama.cpp's "llama" (SentencePiece) model, and our chat template."""
    sp = tokenizer.sp
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([sp.id_to_piece(i).encode("utf-8") for i in range(tokenizer.vocab_size)])
    w.add_token_scores([float(sp.get_score(i)) for i in range(tokenizer.vocab_size)])
    w.add_token_types(token_types(tokenizer))
    w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_eot_token_id(tokenizer.special_ids["end"])
    w.add_unk_token_id(tokenizer.unk_id)
    w.add_pad_token_id(tokenizer.eos_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    w.add_remove_extra_whitespaces(False)
    w.add_chat_template(chat_template(system_prompt))


def modelfile(weights: str = MODELFILE_WEIGHTS, system_prompt: str = DEFAULT_SYSTEM_PROMPT,
              generation: dict | None = None, num_ctx: int = 1024, stops: list[str] | None = None) -> str:
    """An Ollama Modelfile beside the GGUF files: `ollama create supermix -f Modelfile`. `stops`: a base's end
    tokens; then no TEMPLATE (Ollama takes the GGUF's own chat template)."""
    template = ('{{- if .System }}<|system|>{{ .System }}<|end|>{{ end }}\n'
                '{{- range .Messages }}\n'
                '{{- if eq .Role "user" }}<|user|>{{ .Content }}<|end|>\n'
                '{{- else if eq .Role "assistant" }}<|assistant|>{{ .Content }}<|end|>\n'
                '{{- else if eq .Role "context" }}<|context|>{{ .Content }}<|end|>\n'
                '{{- end }}\n'
                '{{- end }}<|assistant|>')
    lines = [f"FROM ./{weights}", "", *([] if stops else [f'TEMPLATE """{template}"""', ""]),
             f'SYSTEM """{system_prompt}"""', ""]
    stops = stops or ["<|end|>", "</s>", "<|user|>", "<|system|>", "<|context|>"]
    lines += [f'PARAMETER stop "{t}"' for t in stops]
    gen = generation or {}
    if "temperature" in gen:
        lines.append(f"PARAMETER temperature {gen['temperature']}")
    if "top_p" in gen:
        lines.append(f"PARAMETER top_p {gen['top_p']}")
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    return "\n".join(lines) + "\n"


def write_gguf_folder(model: Transformer, tokenizer: ChatTokenizer, out: Path, dtypes: tuple[str, ...] = DEFAULT_DTYPES,
                      name: str = "supermix", generation: dict | None = None, log=print) -> list[Path]:
    """The GGUF files and the Modelfile into `out` (a folder the caller makes visible atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for dtype in dtypes:
        log(f"gguf: {gguf_name(dtype)} ...")
        write_gguf(model, tokenizer, out / gguf_name(dtype), dtype, name=name, generation=generation)
        written.append(out / gguf_name(dtype))
    weights = MODELFILE_WEIGHTS if "f32" in dtypes else gguf_name(dtypes[0])
    stops = None
    if isinstance(tokenizer, HFTokenizer):
        from builder.gguf_bpe import end_tokens

        stops = end_tokens(tokenizer)
    (out / "Modelfile").write_text(modelfile(weights, generation=generation, num_ctx=model.cfg.max_seq_len,
                                             stops=stops), encoding="utf-8")
    return [*written, out / "Modelfile"]


def export_gguf(model_path: str | Path, tokenizer_dir: str | Path, out_dir: str | Path,
                dtypes: tuple[str, ...] = DEFAULT_DTYPES, name: str = "supermix", log=print) -> list[Path]:
    """`builder gguf`: checkpoint + tokenizer -> `out_dir` (replaced as a whole once every file is written)."""
    from builder.export import GENERATION_DEFAULTS
    from source.checkpoint import load_model

    tokenizer = load_tokenizer(tokenizer_dir)
    model, ckpt = load_model(model_path, "cpu")
    if ckpt["tokenizer"] != tokenizer.sha256:
        raise ValueError(f"{model_path} was trained with tokenizer {ckpt['tokenizer'][:12]}..., "
                         f"{tokenizer.path} has {tokenizer.sha256[:12]}...")
    out = Path(out_dir)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        files = write_gguf_folder(model.eval(), tokenizer, partial, dtypes, name, GENERATION_DEFAULTS, log)
        for dtype in dtypes:
            check_gguf(partial / gguf_name(dtype), model, tokenizer)
        replace_dir(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return [out / f.name for f in files]


# -----------------------------------------------------------------------------
# read-back check (the export gate; tests check the files independently too)

def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as fp32 in our (HF) layout: dequantized, q/k un-permuted."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    heads = int(reader.fields[f"{arch}.attention.head_count"].contents())
    kv_heads = int(reader.fields[f"{arch}.attention.head_count_kv"].contents())
    out = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(n) for n in reversed(t.shape)])
        if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_qk(w, heads)
        elif arch == "llama" and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_qk(w, kv_heads)
        out[t.name] = w
    return out


def check_gguf(path: Path, model: Transformer, tokenizer: ChatTokenizer) -> None:
    """ValueError unless the file holds `tokenizer`'s pieces and every weight of `model`, exactly as its dtype
    rounds it (f32: equal; f16 and q8_0: equal to our weights rounded the same way)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    pieces = reader.fields["tokenizer.ggml.tokens"].contents()
    if isinstance(tokenizer, HFTokenizer):
        from builder.gguf_bpe import bpe_pieces

        want_pieces = bpe_pieces(tokenizer, model.cfg.vocab_size)
    else:
        want_pieces = [tokenizer.sp.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    if pieces != want_pieces:
        raise ValueError(f"{path}: tokenizer.ggml.tokens differ from {tokenizer.path}")
    file_type = gguf.LlamaFileType(reader.fields["general.file_type"].contents())
    dtype = {gguf.LlamaFileType.ALL_F32: "f32", gguf.LlamaFileType.MOSTLY_F16: "f16",
             gguf.LlamaFileType.MOSTLY_Q8_0: "q8_0"}[file_type]
    got = read_tensors(path)
    want = gguf_tensors(model)
    if set(got) != set(want):
        raise ValueError(f"{path}: tensors {sorted(set(got) ^ set(want))} missing or unexpected")
    for name, (arr, hf_name) in want.items():
        data, raw = _encode_tensor(arr, dtype)
        rounded = gguf.quants.dequantize(data, raw).reshape(arr.shape) if raw is not None else data.astype(np.float32)
        if gguf_arch(model.cfg) == "llama" and name.endswith(("attn_q.weight", "attn_k.weight", "attn_q.bias",
                                                               "attn_k.bias")):
            rounded = unpermute_qk(rounded, model.cfg.n_heads if "attn_q" in name else model.cfg.n_kv_heads)
        if got[name].shape != rounded.shape or not np.array_equal(got[name], rounded):
            raise ValueError(f"{path}: {name} ({hf_name}) differs from the checkpoint")
