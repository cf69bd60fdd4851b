"""Tiny Hugging Face model folders for the tests, built on the spot: a byte-level BPE tokenizer trained with
`tokenizers` on a few hundred lines, a ChatML chat template, and random Llama / Qwen2 weights saved in shards
by transformers' own `save_pretrained`. Nothing is downloaded."""

from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path

# Block tags on their own indented lines: the layout is right only with trim_blocks and lstrip_blocks, as
# transformers renders templates. A first message that is not a system one gets a default system prompt.
CHATML = """{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
    {% endif %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('Unknown role: ' + message['role']) }}
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

# The other features templates use: bos_token and the other special-token variables, transformers' tojson
# (no HTML escaping, non-ASCII kept), filters, loop controls and strftime_now.
FANCY = """{{- bos_token -}}
{%- set meta = {'turns': messages | length, 'note': 'naïve <b>', 'extra': additional_special_tokens} -%}
{{- '<|im_start|>meta\\n' + (meta | tojson) + ' ' + strftime_now('%Y') + '<|im_end|>\\n' -}}
{%- for message in messages -%}
    {%- if loop.index > 40 %}{% break %}{% endif -%}
    {{- '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"""

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[CTRL]"]
TOOL_TOKEN = "<tool_call>"  # a bracketed added token that is not special, as in Qwen's tokenizers


def corpus_lines() -> list[str]:
    """A few hundred lines of English and code: the builtins' docstrings, plus some non-ASCII."""
    lines = []
    for name in sorted(dir(builtins)):
        doc = getattr(getattr(builtins, name), "__doc__", None) or ""
        lines += [ln for ln in doc.splitlines() if ln.strip()]
    return lines + ["naïve café — déjà vu 😀 ünïcödé", "    indented code(x, y=1)\n\ttabbed"] * 5


def byte_level_tokenizer(folder: Path, vocab_size: int = 600) -> Path:
    """A byte-level BPE tokenizer folder (tokenizer.json, tokenizer_config.json with CHATML, ...)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus_lines(), trainer)
    tk.add_tokens([AddedToken(TOOL_TOKEN, special=False, normalized=False)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=["[CTRL]"],
                                   chat_template=CHATML)
    fast.save_pretrained(folder)
    return folder


def with_template(src: Path, dest: Path, template: str) -> Path:
    """A copy of the tokenizer folder `src` whose tokenizer_config.json carries `template` (no .jinja file)."""
    shutil.copytree(src, dest)
    (dest / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((dest / "tokenizer_config.json").read_text())
    (dest / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}, indent=2))
    return dest


def model_folder(folder: Path, tokenizer_dir: Path, model_type: str = "llama", tied: bool = True,
                 head_dim: int | None = None, seed: int = 0, licence: bool = True, extra: dict | None = None,
                 perturb: bool = False) -> Path:
    """Random weights for a tiny causal LM over `tokenizer_dir`'s vocabulary, saved in several shards. `extra`:
    more config fields, or other values for the defaults (rope_scaling, attention_bias, hidden_size, ...). `perturb`: random biases and norm weights (transformers
    starts them at zero and one), so that a forward that ignored them would show."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, rope_theta=50000.0)
    common.update(extra or {})  # may replace the defaults (a wider model, ...)
    torch.manual_seed(seed)
    if model_type == "llama":
        config = LlamaConfig(**common, **({"head_dim": head_dim} if head_dim else {}))
        model = LlamaForCausalLM(config)
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    with torch.no_grad():
        for name, p in model.named_parameters() if perturb else ():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, max_shard_size="100KB")
    tok.save_pretrained(folder)
    if licence:
        (folder / "LICENSE").write_text("MIT License\n\nCopyright (c) the test\n")
        (folder / "README.md").write_text("---\nlicense: mit\n---\n\n# A tiny test model\n")
    return folder
