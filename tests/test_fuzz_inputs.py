"""Seeded fuzzing of what users hand us: random bytes and random JSON shapes for the JSONL readers (`data build
--add`, `sft-data --add`), random bytes, truncations and wrong shapes/types for the checkpoint loader. Every
input is either accepted whole, and usable downstream, or refused with the project's own error naming the
file; never another exception type. A few seconds in all."""

import json
import random
from pathlib import Path

import pytest
import torch

from source.checkpoint import CheckpointError, load_model, read_checkpoint, save_model
from source.config import model_config
from source.corpus import CorpusError
from source.corpus.user_files import records
from source.model import Transformer
from source.sft_data import is_test_entity, summarize, to_chat_messages
from source.sft_format import load_examples

CASES = 200
WORDS = ["user", "assistant", "system", "bot", "", " ", "text", "hi", "\u00e9t\u00e9", "\u4f60\u597d", "\U0001f600",
         "\ud800", "\x00", "a" * 300]


def rand_json(rng: random.Random, depth: int = 0):
    kind = rng.choice(["null", "bool", "int", "float", "str", "str"] + (["list", "dict"] * 2 if depth < 4 else []))
    if kind == "list":
        return [rand_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == "dict":
        return {rng.choice(WORDS + ["role", "content", "title", "meta"]): rand_json(rng, depth + 1)
                for _ in range(rng.randint(0, 3))}
    return {"null": None, "bool": rng.random() < 0.5, "int": rng.choice([0, -1, 2**70]),
            "float": rng.choice([0.5, float("nan"), float("inf")]), "str": rng.choice(WORDS)}[kind]


def rand_example(rng: random.Random):
    """Shapes near the accepted ones (that is where the checks are), with random values in random places."""
    value = lambda: rand_json(rng, 2) if rng.random() < 0.15 else rng.choice(WORDS)  # noqa: E731
    role = lambda r: r if rng.random() < 0.9 else value()  # noqa: E731
    shape = rng.choice(["text", "messages", "messages", "instruction", "random"])
    if shape == "text":
        obj = {"text": value(), "title": value()}
    elif shape == "messages":
        turns = [("user", "assistant")[i % 2] for i in range(rng.randint(1, 4))]
        obj = {"messages": [{"role": role(r), "content": value()} for r in turns]}
    elif shape == "instruction":
        obj = {"instruction": value(), "output": value(), "input": value()}
    else:
        return rand_json(rng)
    for key in rng.sample(["context", "meta", "title"], rng.randint(0, 2)):
        obj[key] = rng.choice([[{"text": value(), "title": value(), "source": value()}], {"kind": value(),
                              "entity": value(), "source": value()}, value()])
    return obj


def rand_line(rng: random.Random) -> bytes:
    pick = rng.random()
    if pick < 0.15:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
    if pick < 0.2:
        return b"[" * rng.choice([10, 5000, 100_000])
    text = json.dumps(rand_example(rng), ensure_ascii=rng.random() < 0.5)
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate this way is invalid UTF-8, CESU-style


@pytest.fixture(scope="module")
def jsonl_files(tmp_path_factory) -> list[Path]:
    rng, root = random.Random(21), tmp_path_factory.mktemp("fuzz-jsonl")
    paths = []
    for i in range(CASES):
        path = root / f"case{i:03}.jsonl"
        path.write_bytes(b"\n".join(rand_line(rng) for _ in range(rng.randint(1, 4))))
        paths.append(path)
    return paths


def test_user_files_for_data_build(jsonl_files):
    accepted = 0
    for path in jsonl_files:
        try:
            recs = list(records(str(path)))
        except CorpusError as e:
            assert str(e).startswith(f"{path}:"), e
            continue
        accepted += 1
        for r in recs:  # what the corpus pipeline and the Parquet writer need
            assert isinstance(r["text"], str) and isinstance(r["title"], str)
            (r["text"] + r["title"]).encode("utf-8")
    assert 0 < accepted < CASES  # the fuzzer reaches both sides


def test_sft_add_files(jsonl_files):
    accepted = 0
    for path in jsonl_files:
        try:
            examples, bad = load_examples(path)
        except ValueError as e:
            assert type(e) is ValueError and str(e).startswith(f"{path}:"), e
            examples, bad = load_examples(path, skip_bad=True)  # --skip-bad never fails on a readable file
            assert bad >= 1
        else:
            accepted += 1
        for ex in examples:  # what generation, the stats and training do with an accepted example
            to_chat_messages(ex)
            is_test_entity(ex["meta"]["entity"])
            json.dumps(ex, ensure_ascii=False).encode("utf-8")
        summarize(examples, [])
    assert accepted > 0


@pytest.fixture(scope="module")
def real_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fuzz-ckpt") / "model.pth"
    save_model(path, Transformer(model_config("tiny", ["vocab_size=300", "n_layers=1"])), "ab" * 32, step=1)
    return path


def rand_checkpoint(rng: random.Random, good: dict) -> dict:
    """The real checkpoint with one to three things wrong in type, shape or value."""
    ckpt = {**good, "config": dict(good["config"]), "model": dict(good["model"])}
    for _ in range(rng.randint(1, 3)):
        what = rng.choice(["config", "config", "weight", "weight", "top"])
        if what == "config":
            ckpt["config"][rng.choice(list(good["config"]) + ["extra"])] = rng.choice(
                [rand_json(rng, 3), 0, -1, 3, 2**40, 1.5, float("nan"), "64", True, [64]])
        elif what == "weight":
            key = rng.choice(list(good["model"]))
            t = good["model"][key]
            ckpt["model"][key] = rng.choice([torch.cat([t, t]), t[:1], t.long(), torch.zeros(()), rand_json(rng, 3),
                                             torch.zeros(t.shape + (1,)), None])
        else:
            key = rng.choice(["config", "model", "tokenizer", "step", "kind", "format"])
            ckpt[key] = rand_json(rng, 2) if rng.random() < 0.7 else ckpt.pop(key, None)
    return ckpt


def test_checkpoint_loader(real_ckpt, tmp_path):
    rng, good, data = random.Random(6), torch.load(real_ckpt, weights_only=True), real_ckpt.read_bytes()
    refused = 0
    for i in range(CASES):
        path = tmp_path / f"case{i:03}.pth"
        kind = i % 4
        if kind == 0:
            path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(0, 2000))))
        elif kind == 1:
            path.write_bytes(data[:rng.randrange(len(data))])
        else:
            torch.save(rand_checkpoint(rng, good), path)
        for load in (read_checkpoint, load_model):
            try:
                load(path)
            except CheckpointError as e:
                assert str(e).startswith(f"{path}: "), e
                refused += load is load_model
    assert refused >= CASES * 0.9  # nearly every case is broken; the rest loaded cleanly
