"""The runtime engine: TorchBackend, sampling, UTF-8/stop streaming, the token budget, chat + citations.

A real tiny model and tokenizer throughout. Where a test needs the model to say something exact
(citations, a stop sequence, emoji), `Steered` runs the real model and adds a large bias to the
scripted next token, so the whole path (prefill, decode, sampling, detokenizing) still runs.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from runtime_python.backends import ChatBackend, TorchBackend, resolve_model
from runtime_python.chat import ChatSession, Reply, generate_stream
from runtime_python.generation import (GenerationConfig, IncrementalDetokenizer, StopChecker, make_generator,
                                       sample_next)
from source.checkpoint import load_model
from source.prompt import build_prompt
from source.sft_data import DEFAULT_SYSTEM_PROMPT, to_chat_messages
from source.tokenizer import Tokenizer

GREEDY = GenerationConfig(temperature=0.0, max_new_tokens=24)


@pytest.fixture(scope="module")
def backend(tiny_base, tiny_workspace) -> TorchBackend:
    torch.set_num_threads(1)  # a training run may share this machine; tiny shapes gain nothing from threads
    return TorchBackend.load(tiny_base, tiny_workspace["tokenizer"])


@pytest.fixture(scope="module")
def tok(backend) -> Tokenizer:
    return backend.tokenizer


@pytest.fixture(scope="module")
def index(tiny_workspace, tmp_path_factory):
    from source.retrieval import Index
    from source.retrieval_build import build_index

    path = tmp_path_factory.mktemp("index") / "i"
    build_index(tiny_workspace["data"], path, progress=False)
    return Index(path)


class Steered(TorchBackend):
    """The real model, with the logit of the next scripted token raised by 1e4."""

    def __init__(self, base: TorchBackend, script: list[int]) -> None:
        self.__dict__.update(base.__dict__)
        self.script, self.i = script, 0

    def _push(self, logits: torch.Tensor) -> torch.Tensor:
        if self.i < len(self.script):
            logits = logits.clone()
            logits[self.script[self.i]] += 1e4
        self.i += 1
        return logits

    def prefill(self, ids):
        self.i = 0
        return self._push(super().prefill(ids))

    def decode(self, token_id):
        return self._push(super().decode(token_id))


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def run(items) -> tuple[list[str], Reply]:
    items = list(items)
    assert isinstance(items[-1], Reply) and all(isinstance(i, str) for i in items[:-1])
    return items[:-1], items[-1]


# ----------------------------------------------------------------------------- backend

def test_greedy_matches_transformer_generate(backend, tok, tiny_base):
    model, _ = load_model(tiny_base)
    msgs = to_chat_messages({"messages": ask("What is a closure?")})
    prompt, _ = tok.encode_chat(msgs)
    stop_ids = (tok.eos_id, tok.bos_id, *tok.special_ids.values())
    expected = model.generate(prompt, max_new_tokens=24, stop_ids=stop_ids)
    assert len(expected) >= 5  # a real comparison, not two empty replies
    got, logits = [], backend.prefill(prompt)
    for _ in range(24):
        nxt = sample_next(logits, GREEDY, got)
        if nxt in stop_ids:
            break
        got.append(nxt)
        logits = backend.decode(nxt)
    assert got == expected
    deltas, reply = run(generate_stream(backend, ask("What is a closure?"), GREEDY, retrieval=False))
    assert reply.text == "".join(deltas) == tok.decode(expected)
    assert reply.prompt_tokens == len(prompt) and reply.completion_tokens == len(expected)


@pytest.mark.parametrize("dtype,atol", [("fp32", 1e-4), ("bf16", 0.05), ("int8", 0.08)])
def test_prefill_decode_logits_match_full_forward(tiny_base, tiny_workspace, dtype, atol):
    model, _ = load_model(tiny_base)
    b = TorchBackend.load(tiny_base, tiny_workspace["tokenizer"], dtype=dtype)
    assert isinstance(b, ChatBackend)
    ids = torch.randint(8, 1000, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.inference_mode():
        full = model(torch.tensor([ids]))[0][0]
    steps = [b.prefill(ids[:17])] + [b.decode(t) for t in ids[17:-1]]
    got = torch.stack(steps)
    assert got.dtype == torch.float32 and got.shape == (23, model.cfg.vocab_size)
    scale = full[16:39].abs().max()
    assert (got - full[16:39]).abs().max() <= atol * scale
    b.release()
    with pytest.raises(RuntimeError, match="released"):
        b.prefill(ids)


def test_backend_errors(backend, tiny_base, tiny_workspace, tmp_path):
    with pytest.raises(ValueError, match="window"):
        backend.prefill([5] * (backend.max_seq_len + 1))
    with pytest.raises(ValueError, match="dtype"):
        TorchBackend.load(tiny_base, tiny_workspace["tokenizer"], dtype="fp8")
    with pytest.raises(ValueError, match="device"):
        TorchBackend.load(tiny_base, tiny_workspace["tokenizer"], device="tpu")
    auto = TorchBackend.load(tiny_base, tiny_workspace["tokenizer"], device="auto")
    assert auto.device.type in ("cpu", "cuda", "mps")
    from source.corpus.build import iter_texts
    from source.tokenizer import train_tokenizer

    other = train_tokenizer(iter_texts(tiny_workspace["data"], "train"), tmp_path / "other", vocab_size=500,
                            max_chars=50_000)
    with pytest.raises(ValueError, match="tokenizer sha256"):
        TorchBackend.load(tiny_base, other)


# ----------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("field,value", [("max_new_tokens", 0), ("max_new_tokens", 1.5), ("temperature", -0.1),
                                         ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.2),
                                         ("top_k", -1), ("repetition_penalty", 0.0), ("stop", ("",)),
                                         ("stop", (1,)), ("seed", -3), ("seed", "7")])
def test_generation_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        GenerationConfig(**{field: value}).validate()


def test_generation_config_defaults_and_normalising():
    cfg = GenerationConfig(stop="###")
    assert cfg.validate() is cfg and cfg.stop == ("###",)
    assert GenerationConfig(temperature=0, top_p=1.0, seed=0).validate().temperature == 0


def test_seed_reproducibility(backend):
    cfg = GenerationConfig(temperature=1.5, top_p=1.0, max_new_tokens=16, seed=1234)
    texts = [run(generate_stream(backend, ask("Tell me something."), cfg, retrieval=False))[1].text
             for _ in range(2)]
    assert texts[0] == texts[1] and texts[0]
    logits = torch.zeros(50)

    def draws(seed: int) -> list[int]:
        g = make_generator(seed)
        return [sample_next(logits, cfg, [], g) for _ in range(20)]

    assert draws(1) == draws(1) and draws(1) != draws(2)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = make_generator(0)
    for cfg, support in [(GenerationConfig(temperature=1.0, top_k=2, top_p=1.0), {0, 1}),
                         (GenerationConfig(temperature=1.0, top_p=0.75), {0, 1}),
                         (GenerationConfig(temperature=1.0, top_p=0.9), {0, 1, 2}),
                         (GenerationConfig(temperature=1.0, top_p=0.1), {0}),
                         (GenerationConfig(temperature=1.0, top_k=3, top_p=0.6), {0, 1})]:
        seen = {sample_next(logits, cfg, [], g) for _ in range(400)}
        assert seen == support, cfg
    wide = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    top5 = set(wide.topk(5).indices.tolist())
    assert {sample_next(wide, GenerationConfig(temperature=2.0, top_k=5), [], g) for _ in range(300)} <= top5


def test_top_p_keeps_the_prefix_a_full_sort_keeps():
    """The candidates top-p cuts from are the best tokens, grown until they hold top_p: for peaked and flat
    distributions over a real-sized vocabulary the kept set is the one a sort of all of it gives."""
    from runtime_python.generation import _top_p_candidates

    g = torch.Generator().manual_seed(0)
    for scale in (0.05, 0.5, 2.0, 8.0):  # flat (thousands kept: the 64 first are too few) to peaked (a handful)
        probs = torch.softmax(torch.randn(8000, generator=g) * scale, dim=-1)
        sorted_probs, order = torch.sort(probs, descending=True)
        want = set(order[:max(1, int((sorted_probs.cumsum(0) - sorted_probs < 0.9).sum()))].tolist())
        vals, idx = _top_p_candidates(probs, 0.9)
        assert set(idx[:max(1, int((vals.cumsum(0) - vals < 0.9).sum()))].tolist()) == want, scale


def test_repetition_penalty():
    logits = torch.tensor([2.0, 1.5, -1.0])
    cfg = GenerationConfig(temperature=0.0, repetition_penalty=2.0)
    assert sample_next(logits, cfg, [0]) == 1  # 2.0 / 2 = 1.0 < 1.5
    assert sample_next(logits, GenerationConfig(temperature=0.0), [0]) == 0
    assert logits.tolist() == [2.0, 1.5, -1.0]  # the caller's logits are untouched
    from runtime_python.generation import apply_repetition_penalty
    assert apply_repetition_penalty(logits, [0, 2, 2], 2.0).tolist() == [1.0, 1.5, -2.0]


# ----------------------------------------------------------------------------- streaming text

def test_utf8_streaming_never_emits_partial_characters(tok):
    text = "Emoji 😀 and 漢字, café € — ok 🚀!"
    ids = tok.encode(text)
    byte_ids = [i for i in ids if tok.id_to_piece(i).startswith("<0x")]
    assert len(byte_ids) >= 8  # the tiny vocabulary spells these in byte-fallback tokens
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    assert any(tok.decode([i]) == "\ufffd" for i in byte_ids)  # why buffering is needed
    first = ids.index(byte_ids[0])  # the first byte of 😀 alone shows nothing yet
    assert deltas[first] == "" and "😀" in "".join(deltas[:first + 4])
    rng = random.Random(0)  # arbitrary ids, broken bytes included: same text as Tokenizer.decode
    for _ in range(300):
        seq = [rng.choice(byte_ids + list(range(tok.vocab_size))) for _ in range(rng.randint(1, 12))]
        d = IncrementalDetokenizer(tok)
        assert "".join(d.push(i) for i in seq) + d.flush() == tok.decode(seq)


def test_utf8_streaming_through_the_engine(backend, tok):
    text = "Emoji 😀 and 漢字 ok"
    b = Steered(backend, tok.encode(text) + [tok.special_ids["end"]])
    deltas, reply = run(generate_stream(b, ask("hi"), GenerationConfig(temperature=0.7, max_new_tokens=40),
                                        retrieval=False))
    assert reply.text == "".join(deltas) == text and reply.finish_reason == "stop"
    assert not any("\ufffd" in d for d in deltas)


def test_stop_checker_holds_back_and_cuts():
    s = StopChecker(["STOP", "\nUser:"])
    out = [s.push(p) for p in ["Hel", "lo S", "T", "OP and more"]]
    assert out == ["Hel", "lo ", "", ""] and s.stopped and s.flush() == ""
    s = StopChecker(["STOP"])
    assert s.push("a ST") == "a " and s.push("ART") == "START" and s.flush() == ""
    s = StopChecker(["ab"])
    assert s.push("xa") == "x" and s.flush() == "a"  # held text that never became a stop is released
    assert StopChecker().push("anything") == "anything"


def test_stop_sequence_spanning_tokens_is_cut(backend, tok):
    text = "The answer is here. STOPWORD and the rest"
    assert len(tok.encode(" STOPWORD")) >= 2
    b = Steered(backend, tok.encode(text))
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=40, stop=("STOPWORD",))
    deltas, reply = run(generate_stream(b, ask("hi"), cfg, retrieval=False))
    assert reply.text == "".join(deltas) == "The answer is here. "
    assert reply.finish_reason == "stop" and not any("S" in d for d in deltas[-3:])


# ----------------------------------------------------------------------------- chat

def test_should_stop_interrupts(backend):
    calls = []
    stop_after = lambda: calls.append(1) or len(calls) > 3
    cfg = GenerationConfig(temperature=1.0, top_p=1.0, max_new_tokens=50, seed=3)
    deltas, reply = run(generate_stream(backend, ask("Talk."), cfg, retrieval=False, should_stop=stop_after))
    assert reply.finish_reason == "stop" and reply.completion_tokens <= 3 and reply.text == "".join(deltas)
    session = ChatSession(backend, retrieval=False)
    calls.clear()
    items = list(session.stream("Talk.", cfg, should_stop=stop_after))
    assert isinstance(items[-1], Reply) and session.history == [
        {"role": "user", "content": "Talk."}, {"role": "assistant", "content": items[-1].text}]
    stream = session.stream("More.", GenerationConfig(temperature=0.0, max_new_tokens=30))
    first = next(stream)
    stream.close()  # e.g. Ctrl-C in the terminal: the partial turn is kept
    assert session.history[-2:] == [{"role": "user", "content": "More."},
                                    {"role": "assistant", "content": first if isinstance(first, str) else ""}]
    session.reset()
    assert session.history == [] and session.last_citations == []


def test_citations_map_to_prompt_numbers(backend, tok, index):
    question = "What does the word abandon mean?"
    shown = index.search(question, 3)
    assert len(shown) == 3
    b = Steered(backend, tok.encode("It means to give up [3], see also [1] and [7].") + [tok.special_ids["end"]])
    _, reply = run(generate_stream(b, ask(question), GenerationConfig(temperature=0.0, max_new_tokens=60),
                                   index=index, k=3))
    assert [s.id for s in reply.sources] == [p.id for p in shown] and [s.number for s in reply.sources] == [1, 2, 3]
    assert [(c.number, c.id) for c in reply.citations] == [(1, shown[0].id), (3, shown[2].id)]  # [7] was never shown
    assert reply.citations[0].to_dict()["title"] == shown[0].title
    prompt = build_prompt(tok, ask(question), [s.to_dict() for s in reply.sources], DEFAULT_SYSTEM_PROMPT, 60, 256)
    assert len(prompt.ids) == reply.prompt_tokens  # the shown passages give the very same prompt
    context = prompt.messages[-2]
    assert context["role"] == "context" and context["content"].startswith(f"[1] {shown[0].title}")
    session = ChatSession(b, index=index)
    b.script = tok.encode("No sources used.") + [tok.special_ids["end"]]
    run(session.stream(question, GenerationConfig(temperature=0.0, max_new_tokens=20)))
    assert session.last_citations == [] and len(session.last_reply.sources) == 3


def test_resolve_model_with_a_registry(tiny_base, tiny_workspace, tmp_path, monkeypatch):
    from source.registry import Registry

    root = tmp_path / "models"
    monkeypatch.chdir(tmp_path)  # no runs/tokenizer here
    with pytest.raises(FileNotFoundError, match="no champion"):
        resolve_model(None, root)
    reg = Registry(root)
    reg.add(tiny_base, tiny_workspace["tokenizer"])
    reg.add(tiny_base, tiny_workspace["tokenizer"])
    with pytest.raises(FileNotFoundError, match="no champion"):
        resolve_model("champion", root)
    reg.promote("v1")
    v1 = (root / "versions/v1/model.pth", root / "versions/v1/tokenizer")
    v2 = (root / "versions/v2/model.pth", root / "versions/v2/tokenizer")
    assert resolve_model(None, root) == resolve_model("champion", root) == resolve_model("v1", root) == v1
    assert resolve_model("latest", root) == resolve_model("2", root) == v2
    assert resolve_model(str(v2[0]), root) == v2  # a path: the tokenizer beside it
    with pytest.raises(ValueError, match="v9"):
        resolve_model("v9", root)
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_model("nope/model.pth", root)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        resolve_model(str(tiny_base), root)
    tok = Path(tiny_workspace["tokenizer"])  # given, the tokenizer need not lie beside the .pth
    assert resolve_model(str(tiny_base), root, tok) == (Path(tiny_base), tok)
    assert resolve_model("v1", root, tok) == (v1[0], tok)
    b = TorchBackend.load(*resolve_model(None, root))
    assert b.name == "v1" and b.tokenizer.sha256 == Tokenizer.load(tiny_workspace["tokenizer"]).sha256
    assert Path(resolve_model(None, root)[0]).is_file()
