"""The export's Hugging Face files: config.json, generation_config.json, model.safetensors and the tokenizer's.

Design choices:
- config.json is `hf_config_dict` of the model's config: LlamaForCausalLM for ours; for a version fine-tuned
  from an imported base, the base's architecture (llama or qwen2, head_dim, biases, rope scaling, tied or not),
  so transformers, transformers.js and optimum load it as they load the base.
- A base's tokenizer files are copied as they are (tokenizer.json, special_tokens_map.json, the licence), with
  the chat template moved into tokenizer_config.json's `chat_template`: transformers.js reads it only there,
  transformers reads it there too (it prefers a chat_template.jinja, so none is written beside it).
- generation_config.json's eos_token_id lists the ids that end a reply (`stop_ids`), eos first.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from source.model import Transformer, hf_config_dict, hf_state_dict
from source.tokenizer import ChatTokenizer, Tokenizer

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# what the runtime and the site start from; a chat model this small rambles when sampled hot
GENERATION_DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 256, "repetition_penalty": 1.0}


def stop_ids(tokenizer: ChatTokenizer) -> list[int]:
    """The ids that end a reply, eos first (generation_config.json's eos_token_id): ours, </s> and <|end|>; a
    base's tokenizer, eos then every other special token, the runtime's rule (runtime_python.chat): its template
    may close a turn with a token other than eos_token."""
    if isinstance(tokenizer, Tokenizer):
        return [tokenizer.eos_id, tokenizer.special_ids["end"]]
    others = {tokenizer.bos_id, *tokenizer.special_ids.values()} - {None, tokenizer.eos_id}
    return [tokenizer.eos_id, *sorted(others)]


def write_tokenizer_files(tokenizer: ChatTokenizer, out: Path) -> None:
    """Ours: its four files. A base's: tokenizer.json, special_tokens_map.json and licence files as they are, and
    tokenizer_config.json with the chat template in its `chat_template` field (transformers.js reads it only there)
    instead of a chat_template.jinja beside it."""
    if isinstance(tokenizer, Tokenizer):
        for name in TOKENIZER_FILES:
            shutil.copyfile(tokenizer.path / name, out / name)
        return
    config = json.loads((tokenizer.path / "tokenizer_config.json").read_text(encoding="utf-8"))
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for src in sorted(tokenizer.path.iterdir()):  # tokenizer.json, special_tokens_map.json, LICENSE, ...
        if src.is_file() and src.name not in ("tokenizer_config.json", "chat_template.jinja"):
            shutil.copyfile(src, out / src.name)


def write_hf_folder(model: Transformer, tokenizer: ChatTokenizer, out: Path) -> None:
    """config.json, generation_config.json, model.safetensors and the tokenizer files."""
    from safetensors.torch import save_file

    stops = stop_ids(tokenizer)
    config = hf_config_dict(model.cfg, tokenizer.bos_id, tokenizer.eos_id)
    config["transformers_version"] = package_version("transformers")
    from builder.export import external_data

    if external_data(model):  # transformers.js fetches onnx/model.onnx_data only when told to
        config["transformers.js_config"] = {"use_external_data_format": {"model.onnx": 1}}
    generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": stops, "pad_token_id": tokenizer.eos_id,
                  "do_sample": True, **{k: v for k, v in GENERATION_DEFAULTS.items() if k != "repetition_penalty"}}
    if generation["bos_token_id"] is None:
        del generation["bos_token_id"]
    state = hf_state_dict(model)
    if model.cfg.tie_embeddings:  # stored once; HF re-ties lm_head from tie_word_embeddings
        state.pop("lm_head.weight")
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    write_tokenizer_files(tokenizer, out)


def package_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"
