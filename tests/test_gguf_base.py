"""GGUF of an imported base's model (byte-level BPE tokenizer, its own chat template): architecture qwen2 or llama,
untied output, head_dim, biases, rope scaling, the "gpt2" tokenizer with merges and the right pre-tokenizer name.
Every file is read back exactly (gguf's reader); with llama-cpp-python installed (not in CI: it compiles
llama.cpp), llama.cpp's tokenizer gives HFTokenizer's ids and its greedy tokens on the f32 file equal ours."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from hf_folders import byte_level_tokenizer, model_folder

from builder.gguf import check_gguf, gguf_name, write_gguf_folder
from builder.gguf_bpe import SPLIT_PATTERNS, pre_tokenizer_name
from source.base_model import load_base

VARIANTS = {  # name -> model_folder arguments
    "llama-untied-hd64-linear": dict(tied=False, head_dim=64, extra={"rope_scaling": {"rope_type": "linear",
                                                                                       "factor": 2.0}}),
    "llama-biases-llama3": dict(extra={"attention_bias": True, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
    "qwen2": dict(model_type="qwen2"),
}
TEXTS = ["hello world", " leading space", "two  spaces\tand a tab\n\nnew paragraph\n", "naïve café ☕ 日本語 🙂",
         "x = 1234567890", "def f(a, b):\n    return a ** b\n", "<|im_start|>user\nhi<|im_end|>", "[CTRL] <tool_call>",
         "", " ", "\n"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{variant: (model, tokenizer, folder with model-{f32,f16,q8_0}.gguf + Modelfile)}."""
    root = tmp_path_factory.mktemp("ggufbase")
    tok_dir = byte_level_tokenizer(root / "tok")
    out = {}
    for i, (name, kwargs) in enumerate(VARIANTS.items()):
        folder = model_folder(root / name, tok_dir, seed=i, perturb=True, **kwargs)
        model, tok, _ = load_base(folder)
        write_gguf_folder(model, tok, root / f"gguf-{name}", name=name, log=lambda _: None)
        out[name] = (model, tok, root / f"gguf-{name}")
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_gguf_of_a_base_reads_back_with_its_architecture_and_tokenizer(name, files):
    import gguf

    model, tok, folder = files[name]
    for dtype in ("f32", "f16", "q8_0"):
        check_gguf(folder / gguf_name(dtype), model, tok)  # every piece and tensor, as its dtype rounds
    reader = gguf.GGUFReader(str(folder / gguf_name("f32")))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    arch = "qwen2" if name == "qwen2" else "llama"
    assert field("general.architecture") == arch and field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == "gpt-2" and field("tokenizer.chat_template") == tok.chat_template
    assert len(field("tokenizer.ggml.merges")) == len(json.loads((tok.path / "tokenizer.json").read_text())["model"]["merges"])
    assert field("tokenizer.ggml.eos_token_id") == tok.eos_id and field(f"{arch}.attention.key_length") == model.cfg.head_dim
    types = field("tokenizer.ggml.token_type")
    assert types[tok.eos_id] == gguf.TokenType.CONTROL and types[tok.tk.token_to_id("<tool_call>")] == gguf.TokenType.USER_DEFINED
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) == (not model.cfg.tie_embeddings)
    assert ("blk.0.attn_q.bias" in names) == model.cfg.qkv_bias and ("rope_freqs.weight" in names) == (name == "llama-biases-llama3")
    if name.endswith("linear"):
        assert field("llama.rope.scaling.type") == "linear" and field("llama.rope.scaling.factor") == 2.0
    modelfile = (folder / "Modelfile").read_text()
    assert "TEMPLATE" not in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_pre_tokenizer_names_and_refusal(files):
    _, tok, _ = files["qwen2"]
    spec = json.loads((tok.path / "tokenizer.json").read_text())
    assert pre_tokenizer_name(spec, "t") == "gpt-2"
    for pattern, want in SPLIT_PATTERNS.items():  # Qwen2's and Llama 3's tokenizer.json
        split = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
        assert pre_tokenizer_name({**spec, "pre_tokenizer": split}, "t") == want
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                    {"type": "ByteLevel", "use_regex": True}]}
    assert pre_tokenizer_name({"pre_tokenizer": smollm}, "t") == "smollm"
    odd = copy.deepcopy(smollm)
    odd["pretokenizers"][0]["individual_digits"] = False
    with pytest.raises(ValueError, match="t: pre_tokenizer .* is not one llama.cpp names"):
        pre_tokenizer_name({"pre_tokenizer": odd}, "t")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_llama_cpp_tokenizes_like_hf_and_greedy_tokens_equal_ours(name, files):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it compiles llama.cpp)")
    from runtime_python.backends import TorchBackend
    from source.prompt import build_prompt
    from source.sft_data import DEFAULT_SYSTEM_PROMPT

    model, tok, folder = files[name]
    vocab = llama_cpp.Llama(model_path=str(folder / gguf_name("f32")), vocab_only=True, verbose=False)
    import pydoc_data.topics

    for text in TEXTS + [p for t in sorted(pydoc_data.topics.topics)[:40] for p in pydoc_data.topics.topics[t].split("\n\n")][:150]:
        assert vocab.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text), text
    prompt = build_prompt(tok, [{"role": "user", "content": "What is a closure?"}], [], DEFAULT_SYSTEM_PROMPT, 32,
                          model.cfg.max_seq_len).ids
    stop = {tok.eos_id, *tok.special_ids.values()}
    backend, ours = TorchBackend(model, tok), []
    logits = backend.prefill(prompt)
    while len(ours) < 32 and int(logits.argmax()) not in stop:
        ours.append(int(logits.argmax()))
        logits = backend.decode(ours[-1])
    llm = llama_cpp.Llama(model_path=str(folder / gguf_name("f32")), n_ctx=model.cfg.max_seq_len, n_threads=2,
                          verbose=False)
    llm.eval(prompt)
    # the last position's logits: greedy tokens of a tiny random model hardly notice rope scaling (measured:
    # the same 32 tokens without it), its logits do (3e-3 / 4e-4 off without it, < 1e-4 with it)
    with torch.no_grad():
        want = model(torch.tensor([prompt]))[0][0, -1].numpy()
    got = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),))
    assert np.abs(got - want).max() < 2e-4
    theirs: list[int] = []
    while len(theirs) < 32:
        token = int(np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),)).argmax())
        if token in stop:
            break
        theirs.append(token)
        llm.eval([token])
    assert len(ours) >= 8 and theirs == ours
