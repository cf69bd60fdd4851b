"""`supermix chat` in a real pseudo-terminal (pexpect) and `supermix ask --json`, with the tiny model."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from runtime_python.cli import main

pexpect = pytest.importorskip("pexpect")

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def model_args(tiny_base, tiny_workspace, tiny_index) -> list[str]:
    return ["--model", str(tiny_base), "--tokenizer", str(tiny_workspace["tokenizer"]), "--index", str(tiny_index)]


# The tiny model writes thousands of tokens/s here: a reply is over before a Ctrl-C can land. The chat
# test runs the real CLI (its default backend, OnnxBackend over the .pth) with each decode step slowed
# to 20 ms, so a 150-token reply takes 3 s.
SLOW_CLI = ("import sys, time; import runtime_python.onnx_backend as b; _decode = b.OnnxBackend.decode; "
            "b.OnnxBackend.decode = lambda self, i: (time.sleep(0.02), _decode(self, i))[1]; "
            "from runtime_python.cli import main; main(prog_name='supermix')")


@pytest.fixture(scope="module")
def seed(tiny_base, tiny_workspace) -> int:
    from runtime_python.onnx_backend import OnnxBackend
    from test_server import long_seed

    return long_seed(OnnxBackend.from_checkpoint(tiny_base, tiny_workspace["tokenizer"]))


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "dumb", "COLUMNS": "200"}


def _default_sigint() -> None:
    """Ctrl-C as a terminal delivers it: an ignored or blocked SIGINT in the test runner (a CI job started in
    the background ignores it) would otherwise pass to the child, and the Ctrl-C tests would hang."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _spawn(args: list[str], cwd: Path, slow: bool = False) -> "pexpect.spawn":
    start = ["-c", SLOW_CLI] if slow else ["-m", "runtime_python.cli"]
    child = pexpect.spawn(sys.executable, [*start, "chat", *args], cwd=str(cwd), env=_env(), encoding="utf-8",
                          timeout=120, dimensions=(40, 200), preexec_fn=_default_sigint)
    child.expect_exact("you> ")
    return child


def _until_prompt(child) -> str:
    child.expect_exact("you> ")
    return ANSI.sub("", child.before).replace("\r\n", "\n")


def test_chat_in_a_pty(model_args, seed, tmp_path):
    child = _spawn([*model_args, "--temperature", "0", "--max-tokens", "16"], tmp_path, slow=True)
    try:
        child.sendline("What is a closure?")
        out = _until_prompt(child)
        stats = re.search(r"\[(.+) · (\d+) tokens · ([\d.]+) tok/s", out)
        assert stats, out
        reply = out.split("What is a closure?", 1)[-1].split("[" + stats.group(1), 1)[0]
        assert reply.strip(), f"no streamed text in {out!r}"

        child.sendline("/sources")
        out = _until_prompt(child)
        assert re.search(r"\[1\] .+ — \S+ \(\S+#\d+\)", out), out

        child.sendline("/set temperature 0")
        assert "temperature = 0" in _until_prompt(child)
        child.sendline("/set temperature -3")
        assert "error: " in _until_prompt(child)
        child.sendline("/set bogus 1")
        assert "error: unknown setting 'bogus'" in _until_prompt(child)
        child.sendline("/set max_new_tokens lots")
        assert "error: max_new_tokens must be an integer" in _until_prompt(child)
        child.sendline("/retrieval maybe")
        assert "retrieval is on" in _until_prompt(child)
        child.sendline("/frobnicate")
        assert "unknown command" in _until_prompt(child)

        # a long reply (a seed that runs to max tokens), stopped with Ctrl-C: the session goes on
        child.sendline("/reset")
        assert "new conversation" in _until_prompt(child)
        child.sendline(f"/set seed {seed}")
        child.expect_exact("you> ")
        child.sendline("/retrieval off")
        child.expect_exact("you> ")
        child.sendline("/set max_new_tokens 150")
        child.expect_exact("you> ")
        child.sendline("/set temperature 1.0")
        child.expect_exact("you> ")
        child.sendline("Tell me a long story about Python.")
        child.expect_exact("Tell me a long story about Python.\r\n")
        child.expect(r"\S")  # the first streamed character
        child.sendintr()
        out = _until_prompt(child)
        assert "(stopped)" in out, out
        assert "150 tokens" not in out, out  # it did not run to its end
        child.sendline("/help")
        assert "/sources" in _until_prompt(child)
        child.sendline("/system Answer in one word.")
        assert "system prompt set" in _until_prompt(child)
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.exitstatus


def test_ctrl_c_and_ctrl_d_at_the_prompt_exit_cleanly(model_args, tmp_path):
    for key in ("intr", "eof"):
        child = _spawn([*model_args, "--no-retrieval"], tmp_path)
        # readline writes the prompt before it reads the terminal: a key sent the instant "you> " appears was
        # once lost on a loaded CI machine (no exit in 120 s); a person never types within that window
        time.sleep(0.5)
        child.sendintr() if key == "intr" else child.sendeof()
        try:
            child.expect(pexpect.EOF)
        except pexpect.TIMEOUT:  # say how the child held SIGINT (blocked, ignored, caught), for the next reader
            status = Path(f"/proc/{child.pid}/status").read_text()
            masks = [line for line in status.splitlines() if line.startswith(("SigBlk", "SigIgn", "SigCgt", "State"))]
            raise AssertionError(f"{key}: no exit; child {masks}") from None
        child.close()
        assert child.exitstatus == 0, (key, child.exitstatus, child.signalstatus)
        assert "Traceback" not in (child.before or "")


def _supermix(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime_python.cli", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=180)


def test_ask_json(model_args, tmp_path):
    r = _supermix("ask", "What is a closure?", *model_args, "--json", "--temperature", "0", "--max-tokens", "12",
                  cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"answer", "citations", "model", "tokens_per_second"}
    assert isinstance(out["answer"], str) and out["tokens_per_second"] > 0
    assert isinstance(out["citations"], list)  # only the sources the answer cites as [n]
    assert all(set(c) == {"id", "title", "source"} for c in out["citations"])
    # the same question again, in-process: greedy, so the same answer; plain output has the text
    again = CliRunner().invoke(main, ["ask", "What is a closure?", *model_args, "--json", "--temperature", "0",
                                      "--max-tokens", "12"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["answer"] == out["answer"]
    plain = CliRunner().invoke(main, ["ask", "What is a closure?", *model_args, "--temperature", "0",
                                      "--max-tokens", "12"])
    assert plain.exit_code == 0 and out["answer"].strip() in plain.output


def test_user_mistakes_are_one_line_errors(model_args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no models/registry.json here
    for args, expect in ((["ask", "hi", *model_args, "--temperature", "-1"], "temperature"),
                         (["chat", "--model", str(tmp_path / "missing.pth")], "missing.pth"),
                         (["ask", "hi"], "no champion"),
                         (["ask", "hi", *model_args[:4], "--index", str(tmp_path / "nope.sqlite")], "nope.sqlite")):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (args, r.output, r.exception)
        assert r.output.startswith("Error: ") and expect in r.output and "Traceback" not in r.output, r.output


def test_set_field_coerces_and_validates():
    from runtime_python.generation import GenerationConfig
    from runtime_python.terminal import set_field

    gen = GenerationConfig()
    assert set_field(gen, "temperature", "0").temperature == 0.0
    assert set_field(gen, "max_tokens", "12").max_new_tokens == 12
    assert set_field(gen, "stop", '["\\n\\n", "###"]').stop == ("\n\n", "###")
    assert set_field(gen, "seed", "7").seed == 7 and set_field(gen, "seed", "none").seed is None
    for field, value in (("temperature", "-1"), ("top_p", "2"), ("nope", "1"), ("top_k", "x")):
        with pytest.raises(ValueError):
            set_field(gen, field, value)
