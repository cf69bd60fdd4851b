"""A bounded fuzz pass over `supermix serve`'s API: random bytes and random JSON shapes (seeded) to every
POST route of a real server with the tiny model. Each answer is a JSON error in OpenAI's shape (4xx) or
a normal completion, never a 500 or a dropped connection, and the server answers a normal request after."""

from __future__ import annotations

import json
import random

import httpx
import pytest

from test_server import ServerThread

ROUTES = ("/v1/chat/completions", "/v1/completions")
CASES = 120  # per route: a few seconds with max_tokens capped at 2


@pytest.fixture(scope="module")
def server(tiny_base, tiny_workspace, tiny_index):
    from runtime_python.backends import TorchBackend
    from runtime_python.server import create_app
    from source.retrieval import Index

    backend = TorchBackend.load(tiny_base, tiny_workspace["tokenizer"])
    with ServerThread(create_app(backend, Index(tiny_index), max_tokens_limit=2)) as s:
        yield s


def random_value(rng: random.Random, depth: int = 0):
    kinds = ["null", "bool", "int", "float", "str", "special"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "null":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice([0, -1, 1, 2, 2**31, -2**63, 10**30])
    if kind == "float":
        return rng.choice([0.5, -0.0, 1e308, -1e-308, 3.0])
    if kind == "str":
        return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x2FFF)]))
                       for _ in range(rng.randrange(0, 12)))
    if kind == "special":
        return rng.choice(["<|system|>", "<|end|>", "</s>", "\u0000", "\ud800", "user", "assistant", "text"])
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {rng.choice(["role", "content", "messages", "prompt", "type", "text", "max_tokens", "n", "stop",
                        "logprobs", "top_logprobs", "seed", "stream", "temperature", "x"]): random_value(rng, depth + 1)
            for _ in range(rng.randrange(0, 5))}


def random_body(rng: random.Random) -> bytes:
    """Raw bytes, broken JSON, or a JSON object whose fields have random shapes (some nearly valid)."""
    roll = rng.random()
    if roll < 0.2:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
    if roll < 0.3:
        return b'{"messages": [{"role": "user", "content": "hi"}' [: rng.randrange(1, 45)]
    body = {"model": "supermix", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}
    for key in rng.sample(sorted(body) + ["stop", "n", "logprobs", "top_logprobs", "seed", "stream", "temperature",
                                          "top_p", "stream_options", "response_format"], rng.randrange(1, 5)):
        body[key] = random_value(rng)
    if rng.random() < 0.3:
        body["messages"] = [random_value(rng) for _ in range(rng.randrange(0, 3))]
    text = json.dumps(body, ensure_ascii=rng.random() < 0.5, allow_nan=True)
    return text.encode("utf-8", "surrogatepass")


def test_random_bodies_get_clear_errors_never_a_crash(server):
    rng = random.Random(20261202)
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for route in ROUTES:
            for case in range(CASES):
                body = random_body(rng)
                r = http.post(route, content=body, headers={"Content-Type": "application/json"})
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                assert r.status_code < 500, (route, case, body[:200], r.text[:300])
                if r.headers.get("content-type", "").startswith("text/event-stream"):
                    assert r.text.rstrip().endswith("data: [DONE]"), (route, body[:200], r.text[-300:])
                    continue
                payload = r.json()
                if r.status_code >= 400:
                    error = payload["error"]
                    assert error["message"] and error["type"], payload
                else:
                    assert payload["choices"], payload
        ok = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"
    assert statuses.get(400, 0) + statuses.get(422, 0) > CASES  # the fuzz mostly reached validation
