"""The GGUF files run in llama.cpp (through llama-cpp-python): its tokenizer gives our ids, its greedy tokens
equal ours on the f32 file (the tiny model and the champion v10), and its chat completion through the GGUF's
own chat template answers what `supermix ask -t 0` answers.

Skipped when `llama_cpp` is not importable: llama-cpp-python is a source package that compiles llama.cpp
(minutes), so CI does not install it. Run it with `pip install -e '.[llama-cpp]'` (docs/pages/export.md).
"""

from pathlib import Path

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the `llama-cpp` extra; "
                                "it compiles llama.cpp, so CI skips these tests)")

from builder.gguf import gguf_name, write_gguf  # noqa: E402
from runtime_python.backends import TorchBackend  # noqa: E402
from source.checkpoint import load_model  # noqa: E402
from source.prompt import build_prompt  # noqa: E402
from source.sft_data import DEFAULT_SYSTEM_PROMPT  # noqa: E402
from source.tokenizer import SPECIAL_TOKENS, Tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
V10 = REPO / "models/versions/v10"
CONVERSATIONS = [
    [{"role": "user", "content": "What does json.dumps do?"}],
    [{"role": "system", "content": "You answer in one sentence."}, {"role": "user", "content": "What is a closure?"}],
    [{"role": "user", "content": "what's a list comprehension"},
     {"role": "assistant", "content": "A compact way to build a list: [x * x for x in range(10)]."},
     {"role": "user", "content": "and how do i read a file line by line?"}],
]
TEXTS = ["hello world", " leading space", "<0x0A> literal", "▁ literal", "emoji 🙂 zwj 👩‍💻", "ümlaut ß", "two  spaces\tand a tab\n\nnew paragraph\n", "naïve café ☕ 日本語 🙂",
         "x = 1234567890", "def f(a, b):\n    return a ** b\n", "<|user|>hi<|end|><|assistant|>", "<s>a</s> <unk>",
         "‹|end|> defused", "", " ", "\n"]


def _llama(path: Path, n_ctx: int):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, n_threads_batch=2, verbose=False)


def _llama_greedy(llm, prompt: list[int], n: int, stop: set[int]) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    while len(out) < n:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),))
        token = int(logits.argmax())
        if token in stop:
            break
        out.append(token)
        llm.eval([token])
    return out


def _our_greedy(backend: TorchBackend, prompt: list[int], n: int, stop: set[int]) -> list[int]:
    """`supermix ask -t 0`'s tokens: the fp32 TorchBackend, argmax each step, stop at a special token."""
    out: list[int] = []
    logits = backend.prefill(prompt)
    while len(out) < n:
        token = int(logits.argmax())
        if token in stop:
            break
        out.append(token)
        logits = backend.decode(token)
    return out


@pytest.fixture(scope="module", params=["tiny", "v10"])
def case(request, tmp_path_factory):
    """(name, model, tokenizer, folder with model-{f32,f16,q8_0}.gguf)."""
    if request.param == "tiny":
        pth, tok_dir = request.getfixturevalue("tiny_base"), request.getfixturevalue("tiny_workspace")["tokenizer"]
    else:
        if not (V10 / "model.pth").is_file():
            pytest.skip(f"{V10}/model.pth is not here")
        pth, tok_dir = V10 / "model.pth", V10 / "tokenizer"
    model, _ = load_model(pth)
    model.eval()
    tok = Tokenizer.load(tok_dir)
    out = tmp_path_factory.mktemp(f"gguf-{request.param}")
    for dtype in ("f32", "f16", "q8_0"):
        write_gguf(model, tok, out / gguf_name(dtype), dtype)
    return request.param, model, tok, out


def test_llama_cpp_tokenizes_and_decodes_like_us(case):
    """llama.cpp's own SentencePiece tokenizer ("llama") on our pieces, scores and types gives our ids and text."""
    import random

    import pydoc_data.topics

    _, model, tok, folder = case
    paragraphs = [p for topic in pydoc_data.topics.topics.values() for p in topic.split("\n\n")]
    texts = TEXTS + random.Random(0).sample(paragraphs, 300)
    llm = llama_cpp.Llama(model_path=str(folder / gguf_name("f32")), vocab_only=True, verbose=False)
    for text in texts:
        ids = tok.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
        # special=False: control tokens print nothing, as our decode skips them; after <s> the dummy prefix goes
        assert llm.detokenize([tok.bos_id, *ids]).decode() == tok.decode(ids), text
    assert llm.tokenize(b"hi", add_bos=True, special=True) == [tok.bos_id] + tok.encode("hi")


def test_greedy_tokens_equal_ours_on_f32_and_agreement_of_f16_q8(case):
    name, model, tok, folder = case
    stop = {tok.sp.piece_to_id(t) for t in SPECIAL_TOKENS}
    n = 48
    prompts = [build_prompt(tok, m, [], DEFAULT_SYSTEM_PROMPT, n, model.cfg.max_seq_len).ids for m in CONVERSATIONS]
    torch.manual_seed(0)
    ours = [_our_greedy(TorchBackend(model, tok), p, n, stop) for p in prompts]
    f32 = _llama(folder / gguf_name("f32"), model.cfg.max_seq_len)
    for prompt, want in zip(prompts, ours):
        assert _llama_greedy(f32, prompt, n, stop) == want
    for dtype in ("f16", "q8_0"):  # reported: rounded weights drift by design
        llm = _llama(folder / gguf_name(dtype), model.cfg.max_seq_len)
        same = total = 0
        for prompt, want in zip(prompts, ours):
            got = _llama_greedy(llm, prompt, n, stop)
            same += next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            total += max(len(want), 1)
        print(f"\n{name}: {dtype} GGUF greedy tokens equal to ours before the first difference: {same}/{total} "
              f"({100 * same / total:.0f}%)")


def test_chat_completion_uses_our_template_and_answers_like_ask(case):
    """llama-cpp-python's own chat path: the GGUF's template -> its tokenizer -> greedy sampling -> text."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    name, model, tok, folder = case
    llm = _llama(folder / gguf_name("f32"), model.cfg.max_seq_len)
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="</s>", bos_token="<s>")
    stop = {tok.sp.piece_to_id(t) for t in SPECIAL_TOKENS}
    for messages in CONVERSATIONS:
        prompt = build_prompt(tok, messages, [], DEFAULT_SYSTEM_PROMPT, 64, model.cfg.max_seq_len).ids
        rendered = formatter(messages=messages).prompt
        assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == prompt
        want = tok.decode(_our_greedy(TorchBackend(model, tok), prompt, 64, stop))
        reply = llm.create_chat_completion(messages=messages, temperature=0.0, repeat_penalty=1.0, max_tokens=64)
        # llama-cpp-python keeps the reply's first "▁" as a space (its detokenizer drops it only after <s>)
        assert reply["choices"][0]["message"]["content"].removeprefix(" ") == want
