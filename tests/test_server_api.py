"""The OpenAI API surface of `supermix serve` beyond plain chat: /v1/completions, logprobs (both
shapes), n, seeds, stop lists, usage details, the models list, the max_tokens limit and the request
timeout; a real uvicorn server with the tiny model, driven by the official `openai` client."""

from __future__ import annotations

import json

import httpx
import pytest

from test_server import LONG, QUESTION, ServerThread, SlowBackend, _wait_idle, client, long_seed

openai = pytest.importorskip("openai")

PROMPT = "A function is"


@pytest.fixture(scope="module")
def runtime(tiny_base, tiny_workspace, tiny_index):
    from runtime_python.backends import TorchBackend
    from source.retrieval import Index

    return TorchBackend.load(tiny_base, tiny_workspace["tokenizer"]), Index(tiny_index)


@pytest.fixture(scope="module")
def models_root(tiny_base, tiny_workspace, tmp_path_factory):
    from source.registry import Registry

    reg = Registry(tmp_path_factory.mktemp("registry") / "models")
    reg.add(tiny_base, tiny_workspace["tokenizer"], notes="one")
    reg.add(tiny_base, tiny_workspace["tokenizer"], notes="two")
    return reg.root


@pytest.fixture(scope="module")
def server(runtime, models_root):
    from runtime_python.server import create_app

    backend, index = runtime
    with ServerThread(create_app(backend, index, models_root=models_root, max_tokens_limit=64)) as s:
        yield s


def engine(runtime, *, messages=None, prompt=None, max_tokens=16, seed=None, temperature=0.0, stop=(),
           retrieval=True):
    """What the engine gives directly (Reply, [TokenLogprob] with 3 alternatives)."""
    from runtime_python.chat import generate_stream
    from runtime_python.generation import GenerationConfig, token_logprob

    backend, index = runtime
    tok = backend.tokenizer
    gen = GenerationConfig(temperature=temperature, max_new_tokens=max_tokens, seed=seed, stop=stop).validate()
    ids = None if prompt is None else [tok.bos_id, *tok.encode(prompt)]
    scored = []
    items = list(generate_stream(backend, messages or [], gen, index=index, retrieval=retrieval, prompt_ids=ids,
                                 on_token=lambda i, logits: scored.append(
                                     token_logprob(tok, logits, i, 3, first=ids is None and not scored))))
    return items[-1], scored


def test_completions_continue_raw_text_streamed_or_not(server, runtime):
    reply, _ = engine(runtime, prompt=PROMPT, max_tokens=12)
    assert reply.text and reply.citations == []
    oc = client(server)
    resp = oc.completions.create(model="x", prompt=PROMPT, temperature=0, max_tokens=12)
    assert resp.object == "text_completion" and resp.model == runtime[0].name
    assert resp.choices[0].text == reply.text
    assert resp.choices[0].finish_reason == reply.finish_reason
    assert resp.usage.prompt_tokens == reply.prompt_tokens == len(runtime[0].tokenizer.encode(PROMPT)) + 1
    chunks = list(oc.completions.create(model="x", prompt=[PROMPT], temperature=0, max_tokens=12, stream=True,
                                        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reply.text
    assert chunks[-1].usage.completion_tokens == reply.completion_tokens
    for body in ({"prompt": PROMPT, "echo": True}, {"prompt": ["a", "b"]}, {"prompt": PROMPT, "max_tokens": 65},
                 {"prompt": "  "}, {"prompt": [10**6]}):
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text


def test_chat_logprobs_come_from_the_sampling_logits(server, runtime):
    messages = [{"role": "user", "content": QUESTION}]
    reply, scored = engine(runtime, messages=messages, max_tokens=16)
    oc = client(server)
    resp = oc.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=16,
                                      logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens == len(scored) > 0
    for got, want in zip(content, scored):
        assert got.token == want.text and bytes(got.bytes) == want.bytes
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4) and got.logprob <= 0
        assert [t.token for t in got.top_logprobs] == [a.text for a in want.top]
        assert got.top_logprobs[0].logprob == pytest.approx(got.logprob, abs=1e-4)  # greedy: the best token
    assert b"".join(bytes(c.bytes) for c in content).decode() == resp.choices[0].message.content
    stream = oc.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=16, stream=True,
                                        logprobs=True, top_logprobs=3)
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]
    plain = oc.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=4)
    assert plain.choices[0].logprobs is None


def test_completions_logprobs_have_the_legacy_shape(server, runtime):
    r = httpx.post(f"{server.url}/v1/completions", timeout=30,
                   json={"prompt": PROMPT, "temperature": 0, "max_tokens": 8, "logprobs": 2}).json()
    lp = r["choices"][0]["logprobs"]
    n = r["usage"]["completion_tokens"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert lp["text_offset"][0] == len(PROMPT)
    for i in range(1, n):
        assert lp["text_offset"][i] == lp["text_offset"][i - 1] + len(lp["tokens"][i - 1])
    assert all(1 <= len(top) <= 2 and max(top.values()) >= lp["token_logprobs"][i] - 1e-4
               for i, top in enumerate(lp["top_logprobs"]))
    assert "".join(lp["tokens"]) == r["choices"][0]["text"]


def test_n_choices_are_seeded_and_usage_counts_the_prompt_once(server, runtime):
    oc = client(server)
    kw = dict(model="x", messages=[{"role": "user", "content": QUESTION}], temperature=1.0, max_tokens=24,
              extra_body={"retrieval": False})
    a = oc.chat.completions.create(n=3, seed=7, **kw)
    b = oc.chat.completions.create(n=3, seed=7, **kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]  # reproducible at temperature 1
    assert len(set(texts)) > 1  # seed + i: the choices differ
    one = oc.chat.completions.create(seed=7, **kw)
    assert one.choices[0].message.content == texts[0]
    assert one.choices[0].message.content == engine(runtime, messages=kw["messages"], max_tokens=24, seed=7,
                                                    temperature=1.0, retrieval=False)[0].text
    u = a.usage
    assert u.prompt_tokens == one.usage.prompt_tokens
    assert u.completion_tokens == sum(engine(runtime, messages=kw["messages"], max_tokens=24, seed=7 + i,
                                             temperature=1.0, retrieval=False)[0].completion_tokens for i in range(3))
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens < u.prompt_tokens
    # b asked the same: its prompt was cached but for the last token (whose logits start the reply)
    assert b.usage.prompt_tokens_details.cached_tokens == b.usage.prompt_tokens - 1


def test_a_stop_list_cuts_a_completion(server, runtime):
    sampled = dict(prompt=PROMPT, max_tokens=24, temperature=1.0, seed=3)
    full, _ = engine(runtime, **sampled)
    words = full.text.split()
    assert len(words) >= 3, full.text
    stop = words[len(words) // 2]
    want, _ = engine(runtime, **sampled, stop=("zzqx", stop, "<never>", "\u2603"))
    resp = client(server).completions.create(model="x", prompt=PROMPT, temperature=1.0, seed=3, max_tokens=24,
                                             stop=["zzqx", stop, "<never>", "\u2603"])
    assert resp.choices[0].text == want.text == full.text[:full.text.index(stop)]
    assert resp.choices[0].finish_reason == "stop"


def test_models_lists_the_served_model_and_the_registry(server, runtime):
    oc = client(server)
    ids = [m.id for m in oc.models.list().data]
    assert ids == [runtime[0].name, "v1", "v2"]
    with pytest.raises(openai.NotFoundError) as e:
        oc.chat.completions.create(model="v1", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert e.value.body["code"] == "model_not_found"


def test_max_tokens_above_the_server_limit_is_a_400(server):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=65)
    assert e.value.body["param"] == "max_tokens" and "64" in e.value.body["message"]
    assert httpx.get(f"{server.url}/health").json()["max_tokens_limit"] == 64


def test_the_request_timeout_stops_a_long_reply(runtime):
    from runtime_python.server import create_app

    seed = long_seed(runtime[0])
    body = {"messages": LONG, "max_tokens": 150, "temperature": 1.0, "seed": seed, "retrieval": False}
    with ServerThread(create_app(SlowBackend(runtime[0]), runtime[1], request_timeout=0.5)) as s:
        r = httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=30)  # ~3 s of tokens
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        _wait_idle(s.url, 2)
        with httpx.stream("POST", f"{s.url}/v1/chat/completions", json={**body, "stream": True}, timeout=30) as r:
            events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "request_timeout"
        assert _wait_idle(s.url, 2)["cancelled"] == 2
