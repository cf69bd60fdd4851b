"""Tokenizer stage: sentencepiece <-> tokenizer.json <-> transformers parity, chat template, CLI.

Trains real tokenizers on the pydoc topics (~0.45 MB, shipped with Python) in well under a second.
"""

from __future__ import annotations

import json
import random

import pytest
from click.testing import CliRunner
from pydoc_data.topics import topics

from source.tokenizer import CHAT_TOKENS, Tokenizer, format_context, train_tokenizer

CORPUS = [topics[k] for k in sorted(topics)]

EDGE_CASES = [
    "", " ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", " \n ", "hello", " hello", "  hello", "hello ",
    "hello   ", "  hello  world  ", "\nhello", "\n hello\n", "hello\r\nworld\r\n", "a\tb\t\tc",
    "tab\tat\tend\t", "    indented = 4\n        deeper = 8\n", "def f(x):\n\treturn x  # comment\n",
    "0", "7", "42", "3.14159", "12345678901234567890123456789", "version 3.11.7, 2024-05-01",
    "1,000,000 and 0x1F and 1e-9", "café naïve résumé Ñandú Ångström", "e\u0301 (combining acute)",
    "Straße ﬁ ligature", "👍", "👍🏽", "👨\u200d👩\u200d👧\u200d👦 family", "🏳️\u200d🌈 flag",
    "emoji at end 🎉", "中文字符测试", "日本語のテキスト", "한국어 문장", "مرحبا بالعالم",
    "שלום עולם", "Ελληνικά κείμενα", "Русский текст", "mixed 中文 and English 123",
    "\u00a0non-breaking\u00a0space", "zero\u200bwidth", "\x00\x01 control \x7f", "\ufeffBOM",
    'print("hello, world!")', "x = [i**2 for i in range(10) if i % 2 == 0]",
    "{\"json\": [1, 2, {\"k\": null}]}", "<html><body>&amp;</body></html>", "a < b > c <= d",
    "~!@#$%^&*()_+`-={}|[]\\:\";'<>?,./", "...", "—–-", "“quotes” ‘single’ «guillemets»",
]
# Contain special-token strings: ids must agree with tokenizer.json, and the text between tokens gets
# its own dummy prefix (per-segment Prepend, see source/tokenizer.py).
SPECIAL_CASES = [
    "<|end|>", "a<|end|>b", "<|user|>hi<|end|><|assistant|>", " <|system|> spaced <|end|> ",
    "<s>hello</s>", "<unk>", "x<|context|>\n[1] t\ntext<|end|>", "<|end|><|end|>", "<|bogus|> <|end",
]


def parity_strings() -> list[str]:
    rng = random.Random(0)
    text = "\n\n".join(CORPUS)
    out = list(EDGE_CASES)
    for _ in range(300):  # real text, cut anywhere (mid-word, mid-indent, mid-newline-run)
        i = rng.randrange(len(text) - 400)
        out.append(text[i:i + rng.randrange(1, 400)])
    soup = " \t\n\r  ab1é中👍<>|\u200d"  # (U+2581 "▁" excluded: sentencepiece decodes it as a space)
    for _ in range(100):
        out.append("".join(rng.choice(soup) for _ in range(rng.randrange(0, 40))))
    return out


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_tokenizer(CORPUS, tmp_path_factory.mktemp("tok"), vocab_size=1500, seed=0)


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.load(tok_dir)


def test_files_and_ids(tok_dir, tok):
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tok_dir / name).is_file()
    assert not list(tok_dir.glob(".*tmp*")), "temporary files left behind"
    assert tok.vocab_size == 1500
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.special_ids == {"system": 3, "user": 4, "assistant": 5, "context": 6, "end": 7}
    assert len(tok.sha256) == 64
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cfg["clean_up_tokenization_spaces"] is False
    assert cfg["additional_special_tokens"] == CHAT_TOKENS
    assert "<0x0A>" in json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]


def test_deterministic(tok_dir, tmp_path):
    again = train_tokenizer(CORPUS, tmp_path, vocab_size=1500, seed=0)
    assert (again / "tokenizer.model").read_bytes() == (tok_dir / "tokenizer.model").read_bytes()
    assert (again / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()


def test_parity_sentencepiece_vs_tokenizer_json(tok_dir, tok):
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    strings = parity_strings()
    assert len(strings) >= 300
    for s in strings:
        sp_ids = [tok.bos_id] + tok.sp.encode(s)
        assert hf.encode(s).ids == sp_ids, repr(s)
        assert tok.encode(s) == sp_ids[1:], repr(s)
        assert tok.decode(sp_ids) == s, repr(s)
        assert hf.decode(sp_ids, skip_special_tokens=True) == s, repr(s)
        assert all(i != tok.unk_id for i in sp_ids), f"byte fallback missed something in {s!r}"
    assert tok.encode_batch(strings) == [tok.sp.encode(s) for s in strings]


def test_parity_with_special_token_strings(tok_dir, tok):
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    for s in SPECIAL_CASES:
        ids = [tok.bos_id] + tok.encode(s)
        assert hf.encode(s).ids == ids, repr(s)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), repr(s)
    # the per-segment dummy prefix: "b" after <|end|> is encoded as " b" would be at text start
    assert tok.encode("a<|end|>b") == tok.encode("a") + [7] + tok.encode("b")
    assert tok.encode_batch(SPECIAL_CASES) == [tok.encode(s) for s in SPECIAL_CASES]


def test_parity_transformers(tok_dir, tok):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    assert isinstance(hf, PreTrainedTokenizerFast)
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (1, 2, 0)
    for s in parity_strings()[::3] + SPECIAL_CASES:
        ids = [tok.bos_id] + tok.encode(s)
        assert hf(s)["input_ids"] == ids, repr(s)
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids), repr(s)


CONVERSATIONS = [
    [{"role": "user", "content": "What does json.dumps do?"}],
    [{"role": "system", "content": "You are Supermix."},
     {"role": "user", "content": "  leading spaces\nand a newline"},
     {"role": "assistant", "content": "It serializes an object to a JSON string [1]."},
     {"role": "user", "content": "Merci ! café 👍🏽 中文"}],
    [{"role": "context", "content": format_context([{"title": "json", "text": "JSON encoder."},
                                                    {"title": "pickle", "text": "Python object serialization."}])},
     {"role": "user", "content": "\ttab first"},
     {"role": "assistant", "content": ""},
     {"role": "assistant", "content": "trailing \n"}],
]


def test_encode_chat_layout_and_mask(tok):
    msgs = CONVERSATIONS[1]
    ids, mask = tok.encode_chat(msgs)
    s = tok.special_ids
    expected = [tok.bos_id]
    expected_mask = [0]
    for m in msgs:
        body = tok.encode(m["content"]) + [s["end"]]
        expected += [s[m["role"]]] + body
        expected_mask += [0] + [int(m["role"] == "assistant")] * len(body)
    assert ids == expected + [s["assistant"]]
    assert mask == expected_mask + [0]
    masked = [i for i, k in zip(ids, mask) if k]
    assert masked == tok.encode(msgs[2]["content"]) + [s["end"]]
    assert tok.decode(masked) == msgs[2]["content"]
    ids2, mask2 = tok.encode_chat(msgs, add_generation_prompt=False)
    assert ids2 == ids[:-1] and mask2 == mask[:-1]


def test_apply_chat_template_matches_encode_chat(tok_dir, tok):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    for msgs in CONVERSATIONS:
        for gen in (True, False):
            ids = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
            assert ids == tok.encode_chat(msgs, add_generation_prompt=gen)[0], msgs
    text = hf.apply_chat_template(CONVERSATIONS[0], tokenize=False, add_generation_prompt=True)
    assert text == "<s><|user|>What does json.dumps do?<|end|><|assistant|>"


def test_unknown_role(tok):
    with pytest.raises(ValueError, match=r"message 1: unknown role 'tool'"):
        tok.encode_chat([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])
    with pytest.raises(ValueError, match="message 0"):
        tok.encode_chat([{"role": "end", "content": "y"}])


def test_format_context():
    text = format_context([{"title": "A", "text": "one\n", "url": "x"}, {"title": "B", "text": "two"}])
    assert text == "[1] A\none\n\n[2] B\ntwo"


def test_vocab_size_errors(tmp_path):
    with pytest.raises(ValueError, match="too large for this corpus"):
        train_tokenizer(CORPUS[:3], tmp_path, vocab_size=8192)
    with pytest.raises(ValueError, match="too small for this corpus"):
        train_tokenizer(CORPUS, tmp_path, vocab_size=300)
    with pytest.raises(ValueError, match="no training text"):
        train_tokenizer(["", "  \n"], tmp_path, vocab_size=500)


def test_max_chars_samples_the_corpus(tmp_path):
    from source.tokenizer import sample_sentences

    sample = sample_sentences(CORPUS, max_chars=50_000, seed=1)
    assert 45_000 < sum(map(len, sample)) <= 50_000
    assert sample == sample_sentences(CORPUS, max_chars=50_000, seed=1)
    assert sample != sample_sentences(CORPUS, max_chars=50_000, seed=2)
    train_tokenizer(CORPUS, tmp_path, vocab_size=600, max_chars=50_000)


def _cli():
    try:  # the whole CLI, once the other command modules exist
        from builder.cli import main
        return main, ["tokenizer"]
    except ImportError:
        from builder.tokenizer_cmd import tokenizer
        return tokenizer, []


def test_cli_train_and_encode(tmp_path):
    cli, prefix = _cli()
    text_file = tmp_path / "corpus.txt"
    text_file.write_text("\n\n".join(CORPUS), encoding="utf-8")
    out = tmp_path / "tok"
    runner = CliRunner()
    res = runner.invoke(cli, prefix + ["train", "--text-file", str(text_file), "--out", str(out),
                                       "--vocab-size", "1000"])
    assert res.exit_code == 0, res.output
    assert "vocab size:   1000" in res.output and "tokenizer.json" in res.output
    assert Tokenizer.load(out).vocab_size == 1000

    res = runner.invoke(cli, prefix + ["encode", "the  value", "--dir", str(out)])
    assert res.exit_code == 0, res.output
    assert "'▁the'" in res.output

    res = runner.invoke(cli, prefix + ["train", "--data", str(tmp_path / "missing"), "--out", str(out)])
    assert res.exit_code != 0 and "builder data build" in res.output
    res = runner.invoke(cli, prefix + ["train", "--text-file", str(text_file), "--out", str(out),
                                       "--vocab-size", "60000"])
    assert res.exit_code != 0 and "too large" in res.output and "Traceback" not in res.output
    assert "Example" in runner.invoke(cli, prefix + ["train", "--help"]).output


def test_cli_train_from_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "built"
    data.mkdir()
    half = len(CORPUS) // 2
    pq.write_table(pa.table({"text": CORPUS[:half]}), data / "train-00000.parquet")
    pq.write_table(pa.table({"text": CORPUS[half:-20]}), data / "train-00001.parquet")
    pq.write_table(pa.table({"text": CORPUS[-20:]}), data / "val-00000.parquet")
    cli, prefix = _cli()
    res = CliRunner().invoke(cli, prefix + ["train", "--data", str(data), "--out", str(tmp_path / "tok"),
                                            "--vocab-size", "800"])
    assert res.exit_code == 0, res.output
    assert "val chars/token:" in res.output
