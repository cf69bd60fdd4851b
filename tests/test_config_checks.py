"""Every training setting has an allowed range: `--set` overrides through the real CLI, and hostile configs
inside real checkpoint files, through the loader that training, the registry and `supermix` share."""

import math
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from builder.cli import main as builder_main
from runtime_python.cli import main as supermix_main
from source.checkpoint import CheckpointError, load_model, read_checkpoint, save_model
from source.config import MODEL_PRESETS, ModelConfig, estimate_params, model_config
from source.model import Transformer
from source.tokenizer import Tokenizer

# (overrides, what the one-line error must say); each once trained silently or died with a traceback
BAD_SETTINGS = [
    (["n_heads=0"], "n_heads=0: must be an integer in [1, 1024]"),
    (["dim=-64"], "dim=-64: must be an integer in [2, 32768]"),
    (["lr=nan"], "lr=nan: must be a finite number in (0, 1]"),
    (["lr=inf"], "lr=inf: must be a finite number in (0, 1]"),
    (["lr=0"], "lr=0.0: must be a finite number in (0, 1]"),
    (["eval_every=0"], "eval_every=0: must be an integer in [1, 1000000000]"),
    (["checkpoint_every=0"], "checkpoint_every=0: must be an integer in [1, 1000000000]"),
    (["log_every=0"], "log_every=0: must be an integer in [1, 1000000000]"),
    (["n_layers=-1"], "n_layers=-1: must be an integer in [1, 1024]"),
    (["ffn_hidden=0"], "ffn_hidden=0: must be an integer in [1, 262144]"),
    (["warmup_steps=-10"], "warmup_steps=-10: must be an integer in [0, 1000000000]"),
    (["grad_clip=-1"], "grad_clip=-1.0: must be a finite number in (0, 1e+06]"),
    (["grad_clip=0"], "grad_clip=0.0: must be a finite number in (0, 1e+06]"),
    (["min_lr_ratio=-20"], "min_lr_ratio=-20.0: must be a finite number in [0, 1]"),
    (["weight_decay=-1"], "weight_decay=-1.0: must be a finite number in [0, 1]"),
    (["beta1=1"], "beta1=1.0: must be a finite number in [0, 1)"),
    (["beta2=-0.5"], "beta2=-0.5: must be a finite number in [0, 1)"),
    (["eval_batches=0"], "eval_batches=0: must be an integer in [1, 1048576]"),
    (["seed=-1"], "seed=-1: must be an integer in [0, 9223372036854775807]"),
    (["norm_eps=0"], "norm_eps=0.0: must be a finite number in (0, 0.1]"),
    (["rope_theta=nan"], "rope_theta=nan: must be a finite number in (1, 1e+12]"),
    (["precision=fp16"], "precision='fp16': must be one of 'bf16', 'fp32'"),
    (["dim=1.5"], "field 'dim': expected an integer, got '1.5'"),
    (["max_seq_len=0"], "max_seq_len=0: must be an integer in [1, 131072]"),
    (["dim=16384", "n_heads=128", "n_kv_heads=128", "n_layers=1024", "ffn_hidden=65536"], "parameters; the limit"),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("settings")  # one cwd, so the token cache under ./runs is built once


@pytest.mark.parametrize("settings,message", BAD_SETTINGS, ids=[" ".join(s) for s, _ in BAD_SETTINGS])
def test_bad_setting_is_one_clear_error_before_any_work(tiny_workspace, workdir, monkeypatch, settings, message):
    monkeypatch.chdir(workdir)
    out = workdir / "run"
    args = ["pretrain", "--data", str(tiny_workspace["data"]), "--tokenizer", str(tiny_workspace["tokenizer"]),
            "--out", str(out), "--no-samples", "--set", "max_steps=2"]
    for s in settings:
        args += ["--set", s]
    r = CliRunner().invoke(builder_main, args)
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (r.output, r.exception)
    assert r.output.startswith("Error: ") and message in r.output and "Traceback" not in r.output, r.output
    assert not out.exists()


def test_estimate_params_is_the_models_count():
    for preset in MODEL_PRESETS:
        for tied in (True, False):
            cfg = ModelConfig(**{**MODEL_PRESETS[preset], "tie_embeddings": tied})
            with torch.device("meta"):
                assert estimate_params(cfg) == Transformer(cfg).num_params()


@pytest.fixture(scope="module")
def good_ckpt(tiny_workspace, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = Transformer(model_config("tiny", ["vocab_size=1000"]))
    path = tmp_path_factory.mktemp("hostile") / "good.pth"
    save_model(path, model, tokenizer_sha256=Tokenizer.load(tiny_workspace["tokenizer"]).sha256, step=3)
    return path


def _mangle(ckpt: dict, case: str) -> None:
    cfg, weights = ckpt["config"], ckpt["model"]
    if case == "terabytes":  # every field in range, the whole far too big: 1M x 32k embeddings is 128 GB alone
        cfg.update(vocab_size=1 << 20, dim=1 << 15, n_heads=32, n_kv_heads=32, n_layers=1024)
    elif case == "vocab 2**40":
        cfg["vocab_size"] = 2**40
    elif case == "n_heads 0":
        cfg["n_heads"] = 0
    elif case == "dim as text":
        cfg["dim"] = "64"
    elif case == "norm_eps nan":
        cfg["norm_eps"] = math.nan
    elif case == "unknown field":
        cfg["n_experts"] = 8
    elif case == "shapes of another config":
        cfg.update(dim=128, ffn_hidden=384)
    elif case == "integer weights":
        weights["norm.weight"] = weights["norm.weight"].long()
    elif case == "weight not a tensor":
        weights["norm.weight"] = [1.0] * 64
    elif case == "negative step":
        ckpt["step"] = -4


HOSTILE = {"terabytes": "parameters; the limit", "vocab 2**40": "vocab_size=1099511627776: must be an integer",
           "n_heads 0": "n_heads=0: must be", "dim as text": "dim='64': must be an integer",
           "norm_eps nan": "norm_eps=nan: must be a finite number", "unknown field": "unknown field(s) 'n_experts'",
           "shapes of another config": "embed_tokens.weight has shape (1000, 64), the config implies (1000, 128)",
           "integer weights": "norm.weight is not a floating-point tensor",
           "weight not a tensor": "norm.weight is not a floating-point tensor (list)",
           "negative step": "field 'step' must be a non-negative integer"}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_checkpoint_config_is_refused_before_allocation(good_ckpt, tmp_path, case):
    ckpt = torch.load(good_ckpt, weights_only=True)
    _mangle(ckpt, case)
    path = tmp_path / "hostile.pth"
    torch.save(ckpt, path)
    for load in (read_checkpoint, load_model):
        with pytest.raises(CheckpointError, match=re.escape(f"{path}: ") + ".*" + re.escape(HOSTILE[case])):
            load(path)


def test_hostile_checkpoint_through_supermix_and_models_add(good_ckpt, tiny_workspace, tmp_path):
    ckpt = torch.load(good_ckpt, weights_only=True)
    _mangle(ckpt, "terabytes")
    path = tmp_path / "hostile.pth"
    torch.save(ckpt, path)
    tok = str(tiny_workspace["tokenizer"])
    r = CliRunner().invoke(supermix_main, ["ask", "hi", "--model", str(path), "--tokenizer", tok, "--no-retrieval"])
    assert r.exit_code == 1 and f"{path}: config: " in r.output and "parameters; the limit" in r.output, r.output
    r = CliRunner().invoke(builder_main, ["models", "--root", str(tmp_path / "models"), "add", str(path),
                                          "--tokenizer", tok])
    assert r.exit_code == 1 and "parameters; the limit" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "models" / "registry.json").exists()
