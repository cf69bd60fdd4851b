"""OnnxBackend over a `.pth`: the GroupQueryAttention graph built in memory, the default of `supermix chat|ask`.

The tiny real model throughout: its greedy tokens must equal TorchBackend fp32's (the reference path),
including far into the window, where the shared KV buffer holds a long context.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime_python.backends import ChatBackend, TorchBackend
from runtime_python.cli import load_runtime
from runtime_python.onnx_backend import OnnxBackend
from source.checkpoint import load_model


@pytest.fixture(scope="module")
def backends(tiny_base, tiny_workspace) -> tuple[OnnxBackend, TorchBackend]:
    torch.set_num_threads(1)
    return (OnnxBackend.from_checkpoint(tiny_base, tiny_workspace["tokenizer"]),
            TorchBackend.load(tiny_base, tiny_workspace["tokenizer"]))


def greedy(backend, prompt: list[int], n: int) -> list[int]:
    """n argmax tokens, no stop: the longest comparison the window allows."""
    out, logits = [], backend.prefill(prompt)
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = backend.decode(out[-1])
    return out


def test_greedy_equals_torch_fp32_short_and_deep_into_the_window(backends):
    fast, reference = backends
    assert isinstance(fast, ChatBackend) and fast.name == "run" and fast.max_seq_len == 256
    tok = fast.tokenizer
    chat, _ = tok.encode_chat([{"role": "user", "content": "What is a closure?"}])
    text = tok.encode("Return a new sorted list from the items in iterable. A custom key function can be given. " * 20)
    long = [tok.bos_id] + text[:199]
    for prompt, n in ((chat, 48), (long, 55)):  # the long one ends one short of the 256-token window
        with torch.inference_mode():
            expected = greedy(reference, prompt, n)
        assert greedy(fast, prompt, n) == expected
    # the tiny model soon repeats itself, so also feed it varied tokens up to the window's end
    ids = torch.randint(8, 1000, (256,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        want = torch.stack([reference.prefill(ids[:150])] + [reference.decode(t) for t in ids[150:-1]])
    got = torch.stack([fast.prefill(ids[:150])] + [fast.decode(t) for t in ids[150:-1]])
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_logits_match_the_full_forward_and_a_new_prompt_reuses_the_buffer(backends, tiny_base):
    fast, _ = backends
    model, _ = load_model(tiny_base)
    ids = torch.randint(8, 1000, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.inference_mode():
        full = model(torch.tensor([ids]))[0][0]
    got = torch.stack([fast.prefill(ids[:17])] + [fast.decode(t) for t in ids[17:-1]])
    assert got.dtype == torch.float32 and got.shape == (23, model.cfg.vocab_size)
    assert (got - full[16:39]).abs().max() <= 1e-4 * full[16:39].abs().max()
    # the buffer now holds 39 positions; a new prompt of 10 (no common prefix) must read only its own
    other, fresh = ids[20:30], OnnxBackend.from_model(model, fast.tokenizer)
    assert torch.equal(fast.prefill(other), fresh.prefill(other)) and fast.cached_tokens == 0
    # a longer prompt that starts with the last one (a chat's next turn) runs only its new tokens
    fast.decode(ids[0])
    turn = other + ids[:25]
    got = torch.stack([fast.prefill(turn)] + [fast.decode(t) for t in ids[25:30]])
    assert fast.cached_tokens == 10
    fresh = OnnxBackend.from_model(model, fast.tokenizer)
    want = torch.stack([fresh.prefill(turn)] + [fresh.decode(t) for t in ids[25:30]])
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_errors_and_release(tiny_base, tiny_workspace):
    b = OnnxBackend.from_checkpoint(tiny_base, tiny_workspace["tokenizer"])
    with pytest.raises(RuntimeError, match="before prefill"):
        b.decode(5)
    with pytest.raises(ValueError, match="window"):
        b.prefill([5] * (b.max_seq_len + 1))
    b.prefill([5] * b.max_seq_len)
    with pytest.raises(ValueError, match="full"):
        b.decode(5)
    b.release()
    with pytest.raises(RuntimeError, match="released"):
        b.prefill([5])


def test_cli_default_is_onnx_for_chat_and_torch_where_it_must_be(tiny_base, tiny_workspace):
    args = (str(tiny_base), tiny_workspace["tokenizer"], None, True)
    assert isinstance(load_runtime(*args).backend, OnnxBackend)
    assert isinstance(load_runtime(*args, backend_kind="onnx").backend, OnnxBackend)
    assert isinstance(load_runtime(*args, backend_kind="torch").backend, TorchBackend)
    assert isinstance(load_runtime(*args, dtype="int8").backend, TorchBackend)
    assert type(load_runtime(*args, batched=True).backend) is TorchBackend  # the server batches on torch


def test_without_onnxruntime_auto_falls_back_to_torch_with_a_note(tiny_base, tiny_workspace):
    code = ("import sys; sys.modules['onnxruntime'] = None\n"  # what `import onnxruntime` meets when it is absent
            "from runtime_python.cli import load_runtime\n"
            f"rt = load_runtime({str(tiny_base)!r}, {str(tiny_workspace['tokenizer'])!r}, None, True)\n"
            "print(type(rt.backend).__name__); print(rt.note)")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr
    kind, note = out.stdout.splitlines()
    assert kind == "TorchBackend"
    assert note == "note: onnxruntime is not installed; running the model with torch (exact, slower)"
