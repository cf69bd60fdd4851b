"""The fast training loss: the chunked linear + cross-entropy equals the plain one, in value and gradients."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from source.config import model_config
from source.model import Transformer, chunked_cross_entropy

MODELS = Path(__file__).resolve().parents[1] / "models"
CHAMPION = MODELS / "versions" / json.loads((MODELS / "registry.json").read_text())["champion"] / "model.pth"


def reference_loss(hidden, weight, targets, token_weights=None):
    """The loss the model computed before chunking: full fp32 logits, then cross-entropy."""
    logits = (hidden @ weight.T).float().flatten(0, -2)
    if token_weights is None:
        return F.cross_entropy(logits, targets.flatten(), ignore_index=-100)
    per_token = F.cross_entropy(logits, targets.flatten(), ignore_index=-100, reduction="none")
    w = token_weights.flatten().float()
    return (per_token * w).sum() / w.sum().clamp_min(1e-8)


def loss_and_grads(fn, hidden, weight, *args):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(hidden, weight, *args)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 37, 16, generator=gen)
    weight = torch.randn(101, 16, generator=gen) * 0.5
    targets = torch.randint(0, 101, (3, 37), generator=gen)
    targets[0, :10] = -100  # ignored positions, as a masked prompt or padding gives them
    targets[2, 30:] = -100
    # SFT weights: 1 on replies, a prompt_loss_weight on the prompt, 0 on padding
    weights = torch.full((3, 37), 0.05)
    weights[:, 20:] = 1.0
    weights[1, 33:] = 0.0
    return hidden, weight, targets, weights


@pytest.mark.parametrize("chunk_rows", [1, 7, 1024])
@pytest.mark.parametrize("weighted", [False, True])
def test_chunked_cross_entropy_equals_the_full_one_with_its_gradients(batch, chunk_rows, weighted):
    hidden, weight, targets, weights = batch
    token_weights = weights if weighted else None
    ours = loss_and_grads(lambda h, w: chunked_cross_entropy(h, w, targets, token_weights, chunk_rows), hidden, weight)
    ref = loss_and_grads(lambda h, w: reference_loss(h, w, targets, token_weights), hidden, weight)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ours[1][0, :10].abs().max() == 0  # ignored rows get no gradient


def test_chunked_cross_entropy_scales_with_the_incoming_gradient(batch):
    """train.py backpropagates loss / grad_accum: the saved gradients must follow that factor."""
    hidden, weight, targets, weights = batch
    ours = loss_and_grads(lambda h, w: chunked_cross_entropy(h, w, targets, weights, 8) / 4, hidden, weight)
    ref = loss_and_grads(lambda h, w: reference_loss(h, w, targets, weights) / 4, hidden, weight)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_under_bf16_autocast_stays_close(batch):
    hidden, weight, targets, weights = batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = loss_and_grads(lambda h, w: chunked_cross_entropy(h, w, targets, weights, 16), hidden, weight)
        ref = loss_and_grads(lambda h, w: reference_loss(h, w, targets, weights), hidden, weight)
    assert ours[0].dtype == torch.float32 and ours[2].dtype == torch.float32
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("mask_kind", ["none", "mask", "weights"])
def test_model_loss_is_the_loss_of_its_logits(mask_kind):
    """The training forward returns the loss alone, equal (with its gradients) to the loss computed from
    the inference forward's logits."""
    torch.manual_seed(0)
    model = Transformer(model_config("tiny", ["vocab_size=300"]))
    x, y = torch.randint(0, 300, (2, 40)), torch.randint(0, 300, (2, 40))
    mask = {"none": None, "mask": (torch.arange(40) >= 15).long().expand(2, 40),
            "weights": torch.where(torch.arange(40) >= 15, 1.0, 0.05).expand(2, 40)}[mask_kind]
    logits, loss = model(x, y, loss_mask=mask)
    assert logits is None
    loss.backward()
    ours = [loss.detach()] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits, none = model(x)
    assert none is None
    targets = y.masked_fill(mask == 0, -100) if mask is not None else y
    per_token = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    w = mask.float() if mask is not None else torch.ones_like(per_token)
    ref_loss = (per_token * w).sum() / w.sum()
    ref_loss.backward()
    ref = [ref_loss.detach()] + [p.grad for p in model.parameters()]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not CHAMPION.is_file(), reason="the champion's model.pth is not in this checkout")
def test_committed_champion_loss_matches_its_logits():
    from source.checkpoint import load_model

    model, _ = load_model(CHAMPION)
    model.eval()
    x = torch.randint(0, model.cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _ = model(x[:, :-1])
        _, loss = model(x[:, :-1], x[:, 1:])
    ref = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_norm_output_is_cast_once_under_autocast_and_unchanged_without():
    """Under bf16 autocast the norm hands its readers (three or two projections) the bf16 tensor they would
    each have cast it to; without autocast (inference) it is the fp32 formula, bit for bit."""
    from source.model import rms_norm

    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 9, 32, generator=gen), torch.randn(32, generator=gen)
    plain = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert torch.equal(rms_norm(x, w, 1e-5), plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rms_norm(x, w, 1e-5)
    assert out.dtype == torch.bfloat16 and torch.equal(out, plain.to(torch.bfloat16))
