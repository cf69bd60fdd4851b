"""`supermix serve`: a real uvicorn server on 127.0.0.1 with the tiny model, driven by the official
`openai` client and raw httpx (errors, disconnects, a small concurrent load, the page)."""

from __future__ import annotations

import importlib.util
import re
import socket
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

QUESTION = "What is a closure?"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn in a daemon thread of this process; `url` once it accepts connections."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def runtime(tiny_base, tiny_workspace, tiny_index):
    from runtime_python.backends import TorchBackend
    from source.retrieval import Index

    return TorchBackend.load(tiny_base, tiny_workspace["tokenizer"]), Index(tiny_index)


@pytest.fixture(scope="module")
def server(runtime):
    from runtime_python.server import create_app

    backend, index = runtime
    with ServerThread(create_app(backend, index, max_queue=16)) as s:
        yield s


def greedy(runtime, messages, max_tokens: int, retrieval: bool = True):
    """The reply the engine gives directly, in this process: what the API must return."""
    from runtime_python.chat import Reply, generate_stream
    from runtime_python.generation import GenerationConfig

    backend, index = runtime
    gen = GenerationConfig(temperature=0.0, max_new_tokens=max_tokens).validate()
    items = list(generate_stream(backend, messages, gen, index=index, retrieval=retrieval))
    reply = items[-1]
    assert isinstance(reply, Reply)
    assert "".join(items[:-1]) == reply.text
    return reply


class SlowBackend:
    """The tiny model with every decode step slowed down: it writes ~1,500 tokens/s here, so a
    reply would end before a client could hang up in the middle of it."""

    def __init__(self, inner, delay: float = 0.02) -> None:
        self._inner, self._delay = inner, delay

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def decode(self, token_id: int):
        time.sleep(self._delay)
        return self._inner.decode(token_id)


LONG = [{"role": "user", "content": "Tell me a long story about Python."}]


def long_seed(backend, max_tokens: int = 150) -> int:
    """A seed whose sampled reply to LONG runs to max_tokens (no early end-of-turn)."""
    from runtime_python.chat import generate_stream
    from runtime_python.generation import GenerationConfig

    for seed in range(50):
        gen = GenerationConfig(temperature=1.0, max_new_tokens=max_tokens, seed=seed)
        if list(generate_stream(backend, LONG, gen, retrieval=False))[-1].finish_reason == "length":
            return seed
    raise AssertionError("no seed in 0..49 gives a reply of max_tokens")


def client(server) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)


def test_openai_client_non_stream_and_stream_give_the_greedy_reply(server, runtime):
    messages = [{"role": "user", "content": QUESTION}]
    expected = greedy(runtime, messages, 24)
    oc = client(server)
    resp = oc.chat.completions.create(model="anything", messages=messages, temperature=0, max_tokens=24)
    assert resp.object == "chat.completion"
    assert resp.model == runtime[0].name
    assert resp.choices[0].message.content == expected.text
    assert resp.choices[0].finish_reason == expected.finish_reason
    assert resp.usage.completion_tokens == expected.completion_tokens
    cited = resp.choices[0].message.model_extra["citations"]
    assert [c["id"] for c in cited] == [c.id for c in expected.citations]

    stream = oc.chat.completions.create(model="anything", messages=messages, temperature=0, max_tokens=24,
                                        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    last = [c for c in chunks if c.choices][-1]
    assert last.choices[0].finish_reason == expected.finish_reason
    assert [c["id"] for c in last.model_extra["citations"]] == [c.id for c in expected.citations]
    assert chunks[-1].usage.completion_tokens == expected.completion_tokens

    # retrieval off through the extension field: no citations, the same reply as the engine's
    plain = greedy(runtime, messages, 12, retrieval=False)
    resp = oc.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=12,
                                      extra_body={"retrieval": False})
    assert resp.choices[0].message.content == plain.text
    assert resp.choices[0].message.model_extra["citations"] == []


def test_models_health_and_passages(server, runtime):
    models = client(server).models.list()
    assert [m.id for m in models.data] == [runtime[0].name]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["retrieval"] is True
    assert health["context"] == runtime[0].max_seq_len
    pid = runtime[1].search(QUESTION, k=1)[0].id
    r = httpx.get(f"{server.url}/v1/passages/{quote(pid, safe='')}")
    assert r.status_code == 200 and r.json()["id"] == pid and r.json()["text"]
    r = httpx.get(f"{server.url}/v1/passages/{quote('no-such#0', safe='')}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


BAD = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}] * 65}, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 16_001}]}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "  "}]}, "messages.0.content"),
    ({"messages": [{"role": "assistant", "content": "hello"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 250}, "max_tokens"),  # + system > window
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 2.5}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -0.1}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 9}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),  # without logprobs
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"content": "hi"}]}, "messages.0.role"),
    ({"model": "x"}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
]


@pytest.mark.parametrize("body,param", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_requests_are_400_with_openai_error_shape(server, body, param):
    for stream in (False, True):
        r = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "stream": stream}, timeout=30)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == "invalid_request_error" and err["message"]
        assert err["param"] == param, err


def test_malformed_bodies_and_the_openai_client_see_400(server):
    for raw in (b"{not json", b"", b"[]", b"x" * (2 << 20)):
        r = httpx.post(f"{server.url}/v1/chat/completions", content=raw,
                       headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}],
                                               temperature=9)
    assert e.value.body["param"] == "temperature"
    r = httpx.get(f"{server.url}/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()


def _long_body(seed: int, stream: bool = True) -> dict:
    return {"messages": LONG, "stream": stream, "max_tokens": 150, "temperature": 1.0, "seed": seed,
            "retrieval": False}


def _wait_idle(url: str, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        h = httpx.get(f"{url}/health").json()
        if not h["running"] and h["waiting"] == 0:
            return h
        assert time.monotonic() < deadline, f"the server is still busy after {seconds} s: {h}"
        time.sleep(0.05)


def test_a_disconnecting_stream_frees_the_model(runtime):
    from runtime_python.server import create_app

    seed = long_seed(runtime[0])
    with ServerThread(create_app(SlowBackend(runtime[0]), runtime[1])) as s:
        with httpx.Client(timeout=30) as c, c.stream("POST", f"{s.url}/v1/chat/completions",
                                                     json=_long_body(seed)) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if '"content":' in line and '"content": ""' not in line:
                    break  # real text: hang up in the middle of a 3 s reply
        t0 = time.monotonic()
        after = _wait_idle(s.url, 2)
        assert after["cancelled"] == 1 and after["completed"] == 0, after  # stopped, not run to its end
        resp = client(s).chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4)
        assert resp.choices[0].message.content is not None
        assert time.monotonic() - t0 < 5


def test_a_full_queue_gets_503_and_frees_up(runtime):
    from runtime_python.server import create_app

    seed = long_seed(runtime[0])
    with ServerThread(create_app(SlowBackend(runtime[0]), runtime[1], max_queue=0)) as s:
        with httpx.Client(timeout=30) as c, c.stream("POST", f"{s.url}/v1/chat/completions",
                                                     json=_long_body(seed)) as r:
            assert r.status_code == 200  # headers come with the first token: it holds the one slot
            busy = httpx.post(f"{s.url}/v1/chat/completions", json=_long_body(seed, stream=False), timeout=30)
            assert busy.status_code == 503
            assert busy.json()["error"]["code"] == "queue_full"
            assert set(busy.json()["error"]) == {"message", "type", "param", "code"}
        _wait_idle(s.url, 2)  # the first client left: its reply stopped
        ok = httpx.post(f"{s.url}/v1/chat/completions", json={**_long_body(seed, False), "max_tokens": 4},
                        timeout=30)
        assert ok.status_code == 200


def test_bounded_concurrent_load_has_no_errors(server):
    spec = importlib.util.spec_from_file_location("load_bench", ROOT / "benchmarks" / "load.py")
    load = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = load  # dataclasses look their module up there
    spec.loader.exec_module(load)
    import asyncio

    res, wall = asyncio.run(load.run_load(server.url, clients=8, seconds=3, max_tokens=8, timeout=60))
    assert res.errors == 0 and res.rejected == 0, res.messages
    assert len(res.latencies) >= 8 and len(res.ttfts) >= len(res.latencies) // 2  # an empty reply has no TTFT
    assert "latency p95" in load.table(res, 8, wall)


def test_the_page_is_served_with_local_assets_only(server):
    r = httpx.get(f"{server.url}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert {"/static/app.js", "/static/style.css"} <= set(assets)
    for a in assets:
        assert a.startswith("/static/"), a
        assert httpx.get(f"{server.url}{a}").status_code == 200
    static = Path(__file__).resolve().parents[1] / "runtime_python" / "static"
    for f in static.iterdir():
        assert not re.search(r"https?://|//cdn|@import", f.read_text()), f"{f.name} references something remote"
    assert 'name="viewport"' in html and "<label" in html
