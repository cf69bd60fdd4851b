"""Bring your own base: `builder base import` a Hugging Face folder, and `supermix` chats with it.

Real, tiny folders built here (tests/hf_folders.py): random Llama (tied head; untied with head_dim other than
hidden/heads) and Qwen2 weights over a byte-level BPE tokenizer with a ChatML template, saved in shards.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from hf_folders import byte_level_tokenizer, model_folder

from builder.cli import main as builder
from runtime_python.cli import main as supermix
from runtime_python.hf_backend import HFBackend
from source.files import sha256_file
from source.prompt import build_prompt
from source.sft_data import DEFAULT_SYSTEM_PROMPT

QUESTION = "What does the list append method do?"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return byte_level_tokenizer(tmp_path_factory.mktemp("tok") / "tok")


@pytest.fixture(scope="module")
def folders(tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {"llama-tied": model_folder(root / "llama-tied", tokenizer_dir),
            "llama-untied": model_folder(root / "llama-untied", tokenizer_dir, tied=False, head_dim=32, seed=1,
                                         licence=False),
            "qwen2": model_folder(root / "qwen2", tokenizer_dir, model_type="qwen2", tied=False, seed=2)}


def base_cli(root, *args):
    return CliRunner().invoke(builder, ["base", "--root", str(root), *args])


def test_import_records_architecture_licence_and_hashes(folders, tmp_path):
    from transformers import AutoModelForCausalLM

    root = tmp_path / "models"
    for name, folder in folders.items():
        assert len(list(folder.glob("model-*.safetensors"))) > 1  # sharded, with an index
        result = base_cli(root, "import", str(folder))
        assert result.exit_code == 0, result.output
        assert f"imported base {name}" in result.output
    bases = json.loads((root / "registry.json").read_text())["bases"]
    assert sorted(bases) == sorted(folders)
    for name, folder in folders.items():
        entry, model = bases[name], AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        arch = entry["architecture"]
        assert arch["params"] == model.num_parameters()
        assert (arch["layers"], arch["hidden"], arch["heads"], arch["kv_heads"], arch["vocab"]) == \
            (2, 64, 4, 2, model.config.vocab_size)
        assert entry["source"] == str(folder.resolve()) and entry["tokenizer"]["chat_template"]
        files = {f["path"]: f for f in entry["files"]}
        assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
        assert {p.name for p in folder.glob("model-*.safetensors")} <= set(files)
        for path, f in files.items():
            assert f["sha256"] == sha256_file(folder / path) and f["bytes"] == (folder / path).stat().st_size
    assert bases["llama-tied"]["architecture"]["tied_embeddings"]
    assert bases["llama-untied"]["architecture"]["head_dim"] == 32 and not bases["llama-untied"]["architecture"][
        "tied_embeddings"]
    assert bases["qwen2"]["architecture"]["attention_bias"] and bases["qwen2"]["architecture"]["model_type"] == "qwen2"
    assert bases["llama-tied"]["licence"]["name"] == "mit" and "MIT License" in bases["llama-tied"]["licence"]["text"]
    assert bases["llama-untied"]["licence"] == {"name": "unknown", "file": None, "text": None}

    listed = base_cli(root, "list")
    assert listed.exit_code == 0 and "llama-untied" in listed.output and "head_dim 32" in listed.output
    assert base_cli(root, "info", "qwen2").exit_code == 0
    again = base_cli(root, "import", str(folders["qwen2"]))
    assert again.exit_code == 1 and "a base named 'qwen2' exists" in again.output
    assert base_cli(root, "remove", "qwen2").exit_code == 0
    assert "qwen2" not in json.loads((root / "registry.json").read_text())["bases"]


def test_info_catches_a_changed_file(folders, tmp_path):
    folder = shutil.copytree(folders["llama-tied"], tmp_path / "copy")
    root = tmp_path / "models"
    assert base_cli(root, "import", str(folder), "--name", "copy").exit_code == 0
    (folder / "LICENSE").write_text((folder / "LICENSE").read_text().replace("MIT", "BSD"))  # same size
    result = base_cli(root, "info", "copy")
    assert result.exit_code == 1 and "LICENSE: sha256 differs from the registry" in result.output
    assert "1 file(s) of base copy differ from the registry: LICENSE" in result.output


def _break(folder, how):
    config = json.loads((folder / "config.json").read_text())
    if how == "no tokenizer.json":
        (folder / "tokenizer.json").unlink()
    elif how == "gpt2":
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    elif how == "shard missing":
        sorted(folder.glob("model-*.safetensors"))[-1].unlink()
    elif how == "wrong type":
        (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": "2"}))
    elif how == "wrong shape":
        (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))


BROKEN = {
    "no tokenizer.json": r"tokenizer.json not found",
    "gpt2": r"config.json: model_type 'gpt2' is not supported \(llama, qwen2\)",
    "shard missing": r"model.safetensors.index.json: weight_map names model-\d+-of-\d+.safetensors, which is missing",
    "wrong type": r"config.json: num_hidden_layers must be a positive integer, got '2'",
    "wrong shape": r"model-\d+-of-\d+.safetensors: tensor model.layers.\d.mlp.\w+_proj.weight has shape \[\d+, \d+\], "
                   r"config.json implies \[\d+, \d+\]",
}


@pytest.mark.parametrize("how", BROKEN)
def test_a_bad_folder_fails_with_one_clear_error_and_the_registry_unchanged(how, folders, tmp_path):
    import re

    root = tmp_path / "models"
    assert base_cli(root, "import", str(folders["llama-tied"]), "--name", "good").exit_code == 0
    before = (root / "registry.json").read_bytes()
    folder = shutil.copytree(folders["llama-untied"], tmp_path / "bad")
    _break(folder, how)
    result = base_cli(root, "import", str(folder))
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and re.search(BROKEN[how], lines[0]), result.output
    assert (root / "registry.json").read_bytes() == before


def test_bad_names_are_refused(folders, tmp_path):
    for name in ("v3", "champion", "../up", ""):
        result = base_cli(tmp_path / "models", "import", str(folders["llama-tied"]), "--name", name)
        assert result.exit_code == 1 and "base name" in result.output, name
    assert not (tmp_path / "models" / "registry.json").exists()


def _reference(folder, messages, max_new_tokens):
    """transformers' own greedy decoding on the prompt supermix builds; the reply cut where supermix stops."""
    from transformers import AutoModelForCausalLM

    backend = HFBackend(folder)
    tok, window = backend.tokenizer, backend.max_seq_len
    ids = build_prompt(tok, messages, [], DEFAULT_SYSTEM_PROMPT, max_new_tokens, window).ids
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens)[0, len(ids):].tolist()
    ends = {tok.eos_id, tok.bos_id, *tok.special_ids.values()}
    reply = out[:next((k for k, i in enumerate(out) if i in ends), len(out))]
    return backend, ids, out, reply


@pytest.mark.parametrize("name", ["llama-tied", "qwen2"])
def test_supermix_ask_greedy_equals_transformers_generate(name, folders):
    folder = folders[name]
    backend, ids, out, reply = _reference(folder, [{"role": "user", "content": QUESTION}], 20)
    tok = backend.tokenizer
    from transformers import AutoTokenizer  # the prompt is the model's own chat template, exactly

    messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": QUESTION}]
    assert ids == AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, add_generation_prompt=True)
    greedy, logits = [], backend.prefill(ids)  # the backend alone, past every stop token
    for _ in range(len(out)):
        greedy.append(int(logits.argmax()))
        logits = backend.decode(greedy[-1])
    assert greedy == out
    assert len(reply) >= 3, "the random model stopped at once: pick another seed for a real check"
    result = CliRunner().invoke(supermix, ["ask", QUESTION, "--model", str(folder), "--no-retrieval", "-t", "0",
                                           "--max-tokens", "20", "--json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["answer"] == tok.decode(reply) and answer["model"] == name


def test_supermix_refuses_what_it_cannot_run(folders, tmp_path):
    folder = shutil.copytree(folders["llama-tied"], tmp_path / "no-template")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    runs = {"no chat_template": ["--model", str(folder)],
            "--tokenizer is for a .pth model": ["--model", str(folders["qwen2"]), "--tokenizer", str(tmp_path)],
            "--dtype int8 is not available for a Hugging Face model (fp32 or bf16)":
                ["--model", str(folders["qwen2"]), "--dtype", "int8"]}
    for message, args in runs.items():
        result = CliRunner().invoke(supermix, ["ask", "hi", "--no-retrieval", *args])
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output
    # a base without a chat template still imports (fine-tuning can give it one); the entry says so
    imported = base_cli(tmp_path / "models", "import", str(folder))
    assert imported.exit_code == 0 and "chat template: none" in imported.output


def test_the_openai_api_serves_an_hf_model(folders):
    """`supermix serve --model HF_FOLDER`: the chat API gives the same greedy reply, streamed or not."""
    pytest.importorskip("openai")
    from test_server import ServerThread, client

    from runtime_python.server import create_app

    backend, _, _, reply = _reference(folders["qwen2"], [{"role": "user", "content": QUESTION}], 20)
    with ServerThread(create_app(backend, None)) as server:
        oc = client(server)
        messages = [{"role": "user", "content": QUESTION}]
        resp = oc.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=20, logprobs=True)
        assert resp.choices[0].message.content == backend.tokenizer.decode(reply)
        assert resp.model == "qwen2" and len(resp.choices[0].logprobs.content) == len(reply)
        stream = oc.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=20, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == backend.tokenizer.decode(reply)
