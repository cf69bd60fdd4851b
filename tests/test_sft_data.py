"""SFT data: the chat layout, the offline generator's invariants, user files, the helper client
against a real HTTP server on 127.0.0.1, and the `builder sft-data` CLI. Real corpus, real index."""

from __future__ import annotations

import http.server
import json
import random
import re
import threading
import time

import pytest
from click.testing import CliRunner

from builder.cli import main
from source.helper_client import (API_KEY_ENV, HelperError, chat_completion, generate_with_helper,
                                  normalize_question, parse_reply, BadReply)
from source.sft_data import (DEFAULT_SYSTEM_PROMPT, NO_ANSWER_REPLIES, add_retrieved_context, generate_examples,
                             is_test_entity, to_chat_messages)
from source.sft_format import load_examples
from source.sft_templates import chitchat_turns, cite, qa_docstring
from source.tokenizer import Tokenizer, format_context

LIMITS = {"pydoc-topics": 150, "wordnet": 300, "docstrings": 0, "python-docs": 0, "foldoc": 0, "chitchat": 0}
MAX_TOKENS = 384


@pytest.fixture(scope="module")
def tokenizer(tiny_workspace) -> Tokenizer:
    return Tokenizer.load(tiny_workspace["tokenizer"])


@pytest.fixture(scope="module")
def generated(tiny_workspace, tiny_index, tokenizer):
    return generate_examples(tiny_workspace["data"], tiny_index, seed=0, limits=LIMITS, tokenizer=tokenizer,
                             max_tokens=MAX_TOKENS)


# ----------------------------------------------------------------------------- layout

def test_to_chat_messages_layout():
    ctx = [{"id": "a#0", "title": "A", "source": "s", "text": "alpha"}, {"id": "b#0", "title": "B", "text": "beta"}]
    ex = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello [1]."},
                       {"role": "user", "content": "What is alpha?"}, {"role": "assistant", "content": "Alpha [1]."}],
          "context": ctx}
    msgs = to_chat_messages(ex)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "context", "user", "assistant"]
    assert msgs[0]["content"] == DEFAULT_SYSTEM_PROMPT
    assert msgs[3]["content"] == format_context(ctx) == "[1] A\nalpha\n\n[2] B\nbeta"
    assert msgs[2]["content"] == "Hello."  # an earlier reply's citation points at nothing shown
    assert msgs[5]["content"] == "Alpha [1]."
    assert ex["messages"][1]["content"] == "Hello [1]."  # the example itself is not changed
    # the runtime: no reply yet, a system prompt of its own, no context
    run = to_chat_messages({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]})
    assert run == [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]
    inst = to_chat_messages({"instruction": "Sum", "input": "1 2", "output": "3"})
    assert inst[1:] == [{"role": "user", "content": "Sum\n\n1 2"}, {"role": "assistant", "content": "3"}]
    assert cite("X is y.", 2) == "X is y [2]." and cite("X is y", 1) == "X is y [1]."


# ----------------------------------------------------------------------------- offline generation

def test_grounded_answers_cite_the_gold_passage(generated):
    train, test = generated
    grounded = [e for e in train + test if e["meta"]["kind"] == "grounded"]
    assert len(grounded) > 300 and {e["meta"]["source"] for e in grounded} == {"pydoc-topics", "wordnet"}
    positions = set()
    for e in grounded:
        ids = [p["id"] for p in e["context"]]
        assert e["meta"]["gold"] in ids and len(ids) <= 3
        cited = re.findall(r"\[(\d+)\]", e["messages"][-1]["content"])
        assert len(cited) == 1 and ids[int(cited[0]) - 1] == e["meta"]["gold"]
        assert e["messages"][-1]["content"].rstrip(".!?").endswith(f"[{cited[0]}]")
        assert len(e["messages"][-1]["content"].split()) <= 60
        positions.add(int(cited[0]))
    assert positions == {1, 2, 3}  # the model must read the sources, not always cite [1]
    assert all(e["meta"]["entity"] in e["messages"][-1]["content"] for e in grounded
               if e["meta"]["source"] == "wordnet")  # "'ephemeral' means ..." names its word


def test_docstring_answers_quote_the_passage_verbatim():
    # rephrased answers ("json.dumps serializes obj to ...") were what v5/v6 garbled
    text = ("json.dumps(obj, *, skipkeys=False, indent=None)\n\nSerialize ``obj`` to a JSON formatted ``str``.\n\n"
            "If ``skipkeys`` is true then ``dict`` keys that are not basic types will be skipped.")
    rec = {"title": "json.dumps", "origin": "json"}
    out = qa_docstring(rec, text, [rec], random.Random(0))
    quote = "Serialize ``obj`` to a JSON formatted ``str``."
    assert out["span"] == quote
    answers = dict(out["qa"])
    assert answers["What does json.dumps do?"] == f"json.dumps: {quote}"
    assert answers["How do I use json.dumps?"] == f"Call json.dumps(obj, *, skipkeys=False, indent=None). json.dumps: {quote}"
    assert answers["What does dumps() in the json module do?"] == f"json.dumps: {quote}"
    assert all(quote in a for a in answers.values())
    assert qa_docstring(rec, "json.dumps(obj)\n\n>>> json.dumps(1)\n'1'", [rec], random.Random(0)) is None  # no prose


def test_no_answer_examples_leave_the_gold_out(generated):
    train, test = generated
    no = [e for e in train + test if e["meta"]["kind"] == "no-answer"]
    grounded = [e for e in train + test if e["meta"]["kind"] == "grounded"]
    assert 0.08 < len(no) / (len(no) + len(grounded)) < 0.25
    for e in no:
        assert e["meta"]["gold"] is None and e["messages"][-1]["content"] in NO_ANSWER_REPLIES
        assert e["context"] and all(not p["id"].startswith(e["meta"]["item"] + "#") for p in e["context"])
        assert all(p["title"].lower() != e["meta"]["entity"].lower() for p in e["context"])


def test_test_split_is_by_entity(generated):
    train, test = generated
    assert test, "5% of a few hundred entities should give some test examples"
    train_entities = {e["meta"]["entity"] for e in train}
    assert all(is_test_entity(e["meta"]["entity"]) for e in test)
    assert not train_entities & {e["meta"]["entity"] for e in test}
    assert not any(is_test_entity(x) for x in train_entities)


def test_generation_is_deterministic_and_seeded(tiny_workspace, tiny_index, tokenizer, generated):
    again = generate_examples(tiny_workspace["data"], tiny_index, seed=0, limits=LIMITS, tokenizer=tokenizer,
                              max_tokens=MAX_TOKENS)
    assert json.dumps(again) == json.dumps(generated)
    other = generate_examples(tiny_workspace["data"], tiny_index, seed=1, limits=LIMITS, tokenizer=tokenizer,
                              max_tokens=MAX_TOKENS)
    assert json.dumps(other) != json.dumps(generated)
    assert all(is_test_entity(e["meta"]["entity"]) for e in other[1])  # the split does not move with the seed


def test_examples_fit_the_token_budget(generated, tokenizer):
    clipped = 0
    for e in generated[0] + generated[1]:
        ids, mask = tokenizer.encode_chat(to_chat_messages(e), add_generation_prompt=False)
        assert len(ids) <= MAX_TOKENS and sum(mask) > 0
        clipped += any(p["text"].endswith(" ...") for p in e.get("context", []))
    assert clipped  # pydoc topics are long: some passages had to be clipped


def test_chitchat_windows_alternate_and_end_with_the_assistant():
    import random

    from source.corpus import chitchat

    if chitchat.missing(None):
        pytest.skip("chitchat-dataset not installed")
    rec = next(r for r in chitchat.records(None) if r["text"].count("\n") > 12)
    windows = chitchat_turns(rec["text"], 3, random.Random(0))
    assert windows
    for w in windows:
        assert len(w) % 2 == 0 and w[0]["role"] == "user" and w[-1]["role"] == "assistant"
        assert all(a["role"] != b["role"] for a, b in zip(w, w[1:]))
        assert all(m["content"] and "\n" not in m["content"] and not m["content"].startswith(("A:", "B:"))
                   for m in w)


def test_chitchat_gets_the_passages_the_runtime_would_retrieve(tiny_index, tokenizer):
    import random

    from source.retrieval import Index

    chats = [{"messages": [{"role": "user", "content": f"Hi! Do you like {w}?"},
                           {"role": "assistant", "content": "Sure, I like it a lot."}],
              "meta": {"kind": "chitchat", "entity": f"c{i}", "source": "chitchat", "gold": None}}
             for i, w in enumerate(["lists", "words", "classes", "loops"] * 5)]
    qa = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a [1]."}],
          "context": [], "meta": {"kind": "grounded"}}
    index = Index(tiny_index)
    try:
        added = add_retrieved_context(chats + [qa], index, random.Random(0), tokenizer, MAX_TOKENS, share=0.5)
        with_context = [c for c in chats if c.get("context")]
        assert added == len(with_context) and 3 <= added <= 17 and qa["context"] == []  # QA is left alone
        for chat in with_context:
            hits = [p.id for p in index.search(chat["messages"][0]["content"], 3)]
            assert [p["id"] for p in chat["context"]] == hits
            assert chat["messages"][-1]["content"] == "Sure, I like it a lot."  # the reply cites nothing
            ids, mask = tokenizer.encode_chat(to_chat_messages(chat), add_generation_prompt=False)
            assert len(ids) <= MAX_TOKENS and sum(mask) > 0
    finally:
        index.close()


# ----------------------------------------------------------------------------- user files

def test_load_examples_both_formats_and_bad_lines(tmp_path):
    good = [{"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4"}]},
            {"instruction": "Reverse the word", "input": "abc", "output": "cba"},
            {"instruction": "Say hi", "output": "Hi!", "meta": {"kind": "user", "entity": "greeting"}}]
    f = tmp_path / "mine.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in good) + "\n\n")
    examples, bad = load_examples(f)
    assert bad == 0 and len(examples) == 3
    assert examples[1]["messages"][0]["content"] == "Reverse the word\n\nabc"
    assert all(e["meta"]["kind"] == "user" for e in examples) and examples[2]["meta"]["entity"] == "greeting"

    cases = [("{not json", "invalid JSON"),
             (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "messages[0].role"),
             (json.dumps({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}),
              "messages[0].content"),
             (json.dumps({"instruction": "x"}), "output: missing"),
             (json.dumps({"messages": [{"role": "user", "content": "q"}]}), "messages[0].role"),
             (json.dumps({"text": "x"}), "messages: missing")]
    for line, field in cases:
        f.write_text(json.dumps(good[0]) + "\n" + line + "\n" + json.dumps(good[1]) + "\n")
        with pytest.raises(ValueError, match=re.escape(f"{f}:2: ") + ".*" + re.escape(field)):
            load_examples(f)
        examples, bad = load_examples(f, skip_bad=True)
        assert (len(examples), bad) == (2, 1)


def test_add_file_with_invalid_utf8_names_file_line_and_byte_and_skip_bad_skips_it(tiny_workspace, tiny_index,
                                                                                    tmp_path):
    good = json.dumps({"instruction": "Say hi", "output": "Hi!"}).encode() + b"\n"
    mine = tmp_path / "mine.jsonl"
    mine.write_bytes(good + b'{"instruction": "caf\xe9", "output": "x"}\n' + good)
    with pytest.raises(ValueError, match=re.escape(f"{mine}:2: not valid UTF-8 (byte {len(good) + 20} of the file")):
        load_examples(mine)
    examples, bad = load_examples(mine, skip_bad=True)
    assert (len(examples), bad) == (2, 1)

    out = tmp_path / "sft"
    args = ["sft-data", "--data", str(tiny_workspace["data"]), "--index", str(tiny_index), "--out", str(out),
            "--tokenizer", str(tiny_workspace["tokenizer"]), "--limit", "100", "--quiet", "--add", str(mine)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and f"{mine}:2: not valid UTF-8" in r.output and not out.exists()
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit)
    r = CliRunner().invoke(main, args + ["--skip-bad"])
    assert r.exit_code == 0, r.output
    assert "bad lines skipped in --add files: 1" in r.output
    assert json.loads((out / "stats.json").read_text())["bad_lines"] == {str(mine): 1}


# ----------------------------------------------------------------------------- helper client

class _Helper(http.server.BaseHTTPRequestHandler):
    """An OpenAI-shaped /v1/chat/completions: one 429 first, one malformed title, two titles that
    produce the same question; model "bad-key" gets a 401, model "slow" sleeps once."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv.auth.append(self.headers.get("Authorization"))
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": "no such path"})
        if body["model"] == "bad-key":
            return self._send(401, {"error": {"message": "invalid api key"}})
        if body["model"] == "slow" and not srv.slept:
            srv.slept = True
            time.sleep(0.6)
        if srv.fail_next:
            srv.fail_next -= 1
            return self._send(429, {"error": "slow down"}, {"Retry-After": "0"})
        title = re.search(r"Source \[1\] \((.*?)\):", body["messages"][-1]["content"]).group(1)
        srv.log.append(title)
        n = srv.titles.setdefault(title, len(srv.titles))
        if n % 5 == 3:
            content = "Sure! Here is a great question about it."
        elif n in (1, 2):
            content = '```json\n{"question": "What is the shared thing?", "answer": "It is shared [1]."}\n```'
        else:
            content = json.dumps({"question": f"What is {title}?", "answer": f"{title} is in the source [1]."})
        self._send(200, {"id": "c1", "object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": content}}]})

    def _send(self, code, obj, headers=None):
        data = json.dumps(obj).encode()
        self.send_response(code)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def helper_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Helper)
    srv.fail_next, srv.slept, srv.log, srv.titles, srv.auth = 0, False, [], {}, []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def test_chat_completion_retries_then_gives_up_or_fails_fast(helper_server, monkeypatch):
    srv, url = helper_server
    msgs = [{"role": "user", "content": "Source [1] (x):\nhello"}]
    srv.fail_next = 2
    assert "x is in the source [1]" in chat_completion(url, "m", msgs, backoff=0.01)
    assert srv.fail_next == 0
    srv.fail_next = 5
    with pytest.raises(HelperError, match="gave up after 3 attempts.*429"):
        chat_completion(url, "m", msgs, retries=2, backoff=0.01)
    n = len(srv.auth)
    with pytest.raises(HelperError, match="HTTP 401"):
        chat_completion(url, "bad-key", msgs, backoff=0.01)
    assert len(srv.auth) == n + 1  # no retry: a wrong key will not fix itself
    assert "x is in the source" in chat_completion(url, "slow", msgs, timeout=0.3, backoff=0.01)  # timeout, retry
    with pytest.raises(HelperError, match="HTTP 404"):
        chat_completion(url.removesuffix("/v1"), "m", msgs)


def test_parse_reply_validates():
    assert parse_reply('{"question": " What  is x? ", "answer": "x is y [1]."}') == ("What is x?", "x is y [1].")
    for bad in ("no json here", '{"question": "q"}', '{"question": "q", "answer": "no cite"}',
                '{"question": "q", "answer": "cites [2]."}', '["q", "a"]', "{broken"):
        with pytest.raises(BadReply):
            parse_reply(bad)
    assert normalize_question("What is  X?") == normalize_question("what is x")


def test_generate_with_helper_retries_skips_resumes_and_dedups(helper_server, tiny_workspace, tiny_index,
                                                               tokenizer, tmp_path, monkeypatch):
    srv, url = helper_server
    monkeypatch.setenv(API_KEY_ENV, "sk-test")
    out = tmp_path / "helper.jsonl"
    srv.fail_next = 1  # the very first call gets a 429
    s1 = generate_with_helper(tiny_workspace["data"], out, url, "m", 6, tiny_index, backoff=0.01,
                              tokenizer=tokenizer, max_tokens=MAX_TOKENS)
    assert s1["written"] == 6 and s1["duplicates"] == 1 and s1["bad_replies"] == 1
    assert s1["bad_reply_attempts"] == 3  # asked three times, then skipped
    assert srv.fail_next == 0 and set(srv.auth) == {"Bearer sk-test"}
    first = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(first) == 6
    for e in first:
        assert e["meta"]["kind"] == "helper" and not is_test_entity(e["meta"]["entity"])
        ids = [p["id"] for p in e["context"]]
        pos = int(re.findall(r"\[(\d+)\]", e["messages"][-1]["content"])[0])
        assert ids[pos - 1] == e["meta"]["gold"] and e["meta"]["gold"].startswith(e["meta"]["item"] + "#")
        ids, _ = tokenizer.encode_chat(to_chat_messages(e), add_generation_prompt=False)
        assert len(ids) <= MAX_TOKENS

    asked_before = len(srv.log)
    s2 = generate_with_helper(tiny_workspace["data"], out, url, "m", 9, tiny_index, backoff=0.01)
    assert s2["existing"] == 6 and s2["written"] == 3
    done_titles = {e["meta"]["entity"] for e in first}
    assert not done_titles & set(srv.log[asked_before:])  # done items are not asked again
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 9 and len({e["meta"]["item"] for e in lines}) == 9
    assert len({normalize_question(e["messages"][0]["content"]) for e in lines}) == 9
    asked = len(srv.log)
    s3 = generate_with_helper(tiny_workspace["data"], out, url, "m", 9, tiny_index)
    assert s3["written"] == 0 and len(srv.log) == asked  # already complete: nothing is asked


# ----------------------------------------------------------------------------- CLI

def test_cli_end_to_end(helper_server, tiny_workspace, tiny_index, tmp_path):
    srv, url = helper_server
    mine = tmp_path / "mine.jsonl"
    mine.write_text(json.dumps({"instruction": "Say hi", "output": "Hi!"}) + "\n{oops\n")
    out = tmp_path / "sft"
    args = ["sft-data", "--data", str(tiny_workspace["data"]), "--index", str(tiny_index), "--out", str(out),
            "--tokenizer", str(tiny_workspace["tokenizer"]), "--limit", "400", "--quiet", "--add", str(mine)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and f"{mine}:2: invalid JSON" in r.output and not out.exists()

    r = CliRunner().invoke(main, args + ["--skip-bad", "--helper-url", url, "--helper-model", "m",
                                         "--helper-count", "4"])
    assert r.exit_code == 0, r.output
    assert "grounded/wordnet" in r.output and "user/user" in r.output and "helper/" in r.output
    stats = json.loads((out / "stats.json").read_text())
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    assert stats["train"]["total"] == len(train) and stats["test"]["total"] == len(test)
    assert stats["bad_lines"] == {str(mine): 1} and stats["train"]["by_kind"]["user"] == 1
    assert stats["train"]["by_kind"]["helper"] == 4 and len((out / "helper.jsonl").read_text().splitlines()) == 4
    assert not list(out.glob(".*tmp*"))

    r = CliRunner().invoke(main, ["sft-data", "--data", str(tiny_workspace["data"]), "--index",
                                  str(tmp_path / "nope.sqlite"), "--out", str(out)])
    assert r.exit_code == 1 and "run `builder index build` first" in r.output
    r = CliRunner().invoke(main, ["sft-data", "--data", str(tmp_path), "--index", str(tiny_index)])
    assert r.exit_code == 1 and "run `builder data build` first" in r.output
