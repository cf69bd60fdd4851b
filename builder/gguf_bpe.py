"""GGUF metadata for a byte-level BPE tokenizer (an imported base's tokenizer.json), as llama.cpp's "gpt2" model.

Design choices:
- tokenizer.ggml.model "gpt2": every id's piece as tokenizer.json spells it (GPT-2's byte alphabet), its merges
  in rank order ("a b"), and token types: special added tokens CONTROL (never printed, matched in text only when
  the caller parses special tokens, as transformers does), other added tokens USER_DEFINED (matched as they are),
  the rest NORMAL. An embedding table larger than the vocabulary (Qwen pads it) gets "[PAD{i}]" UNUSED pieces, as
  llama.cpp's own converter writes, since llama.cpp wants one piece per row.
- tokenizer.ggml.pre names llama.cpp's pre-tokenizer (its splitting regex). It is read from tokenizer.json's
  `pre_tokenizer`, not guessed from a hash: GPT-2's ByteLevel regex -> "gpt-2", individual digits then ByteLevel
  (SmolLM) -> "smollm", the Qwen2 and Llama 3 Split regexes -> "qwen2" and "llama-bpe". Anything else is refused
  by name: a wrong pre-tokenizer would give other ids without any error.
- The chat template is the model's own; eot = eos (the token its template ends a turn with); add_bos as
  tokenizer_config.json says (off unless it says so: templates that want a BOS write it themselves).
"""

from __future__ import annotations

import json

from source.hf_tokenizer import HFTokenizer, read_json_object

# the Split regexes of Qwen2's and Llama 3's tokenizer.json (they differ in \p{N} vs \p{N}{1,3})
_LETTERS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLIT_PATTERNS = {_LETTERS + r"\p{N}" + _REST: "qwen2", _LETTERS + r"\p{N}{1,3}" + _REST: "llama-bpe"}


def pre_tokenizer_name(spec: dict, where: str) -> str:
    """llama.cpp's tokenizer.ggml.pre for tokenizer.json's pre_tokenizer; ValueError naming it when unknown."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    last = steps[-1] if steps else {}
    if kinds == ["ByteLevel"] and last.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and last.get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True):
        name = SPLIT_PATTERNS.get((steps[0].get("pattern") or {}).get("Regex"))
        if name and steps[0].get("behavior") == "Isolated":
            return name
    raise ValueError(f"{where}: pre_tokenizer {json.dumps(pre)[:160]} is not one llama.cpp names here (GPT-2's "
                     "ByteLevel, SmolLM's digits + ByteLevel, or the Qwen2 / Llama 3 Split regex)")


def bpe_pieces(tokenizer: HFTokenizer, n_vocab: int) -> list[str]:
    """The piece of every embedding row: tokenizer.json's, then "[PAD{i}]" for rows past the vocabulary."""
    if tokenizer.vocab_size > n_vocab:
        raise ValueError(f"{tokenizer.path / 'tokenizer.json'}: {tokenizer.vocab_size} tokens, the model has only "
                         f"{n_vocab} embeddings")
    return [tokenizer.tk.id_to_token(i) or f"[PAD{i}]" for i in range(n_vocab)]


def add_bpe_tokenizer(w, tokenizer: HFTokenizer, n_vocab: int) -> None:
    """tokenizer.ggml.* and tokenizer.chat_template of `tokenizer` into the GGUFWriter `w`."""
    import gguf

    where = str(tokenizer.path / "tokenizer.json")
    spec = json.loads((tokenizer.path / "tokenizer.json").read_text(encoding="utf-8"))
    if not tokenizer.byte_level or (spec.get("model") or {}).get("type") != "BPE":
        raise ValueError(f"{where}: GGUF export takes a byte-level BPE tokenizer (Llama 3, Qwen, SmolLM); "
                         "this one is not")
    config = read_json_object(tokenizer.path / "tokenizer_config.json")
    added = tokenizer.tk.get_added_tokens_decoder()
    types = []
    for i, piece in enumerate(bpe_pieces(tokenizer, n_vocab)):
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.UNUSED if i >= tokenizer.vocab_size else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer_name(spec, where))
    w.add_token_list([p.encode("utf-8") for p in bpe_pieces(tokenizer, n_vocab)])
    w.add_token_types([int(t) for t in types])
    w.add_token_merges(merges)
    if tokenizer.bos_id is not None:
        w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_eot_token_id(tokenizer.eos_id)
    pad = tokenizer.template_vars.get("pad_token")
    w.add_pad_token_id(tokenizer.tk.token_to_id(pad) if pad and tokenizer.tk.token_to_id(pad) is not None
                       else tokenizer.eos_id)
    w.add_add_bos_token(bool(config.get("add_bos_token", False)) and tokenizer.bos_id is not None)
    w.add_add_eos_token(False)
    if tokenizer.chat_template is not None:
        w.add_chat_template(tokenizer.chat_template)


def end_tokens(tokenizer: HFTokenizer) -> list[str]:
    """The spellings that end a reply (the Modelfile's stops): eos, then the other special tokens."""
    return list(dict.fromkeys([tokenizer.template_vars["eos_token"], *tokenizer.special_ids]))
