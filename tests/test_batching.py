"""Continuous batching (runtime_python/batching.py): the tiny real model, real tokenizer, real threads.

"Alone" is a TorchBackend running one conversation: the reference every batched request must match
bit for bit (logits) and so token for token (greedy replies).
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from runtime_python.backends import TorchBackend
from runtime_python.batching import Cancelled, Engine
from runtime_python.chat import Reply, generate_stream
from runtime_python.generation import GenerationConfig

GREEDY = GenerationConfig(temperature=0.0, max_new_tokens=24)
QUESTIONS = ["What is a closure?", "Define ephemeral.", "hi",
             "How do I read a file in Python, and what does the with statement do when the block ends?",
             "What is a hash table? Explain buckets, collisions, resizing and the cost of a lookup in detail."]


@pytest.fixture(scope="module")
def backend(tiny_base, tiny_workspace) -> TorchBackend:
    torch.set_num_threads(1)
    return TorchBackend.load(tiny_base, tiny_workspace["tokenizer"])


@pytest.fixture
def fresh(tiny_base, tiny_workspace):
    """A new batch-1 backend per call: no prompt cache carried over."""
    return lambda: TorchBackend.load(tiny_base, tiny_workspace["tokenizer"])


def ask(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


def run(backend, messages, gen=GREEDY) -> Reply:
    items = list(generate_stream(backend, messages, gen, retrieval=False))
    assert "".join(items[:-1]) == items[-1].text
    return items[-1]


def greedy_logits(b, ids: list[int], n: int) -> list[torch.Tensor]:
    """Prefill `ids`, then n greedy decodes: every step's logits."""
    out = [b.prefill(ids)]
    for _ in range(n):
        out.append(b.decode(int(out[-1].argmax())))
    return out


def test_batched_logits_and_replies_equal_running_alone(backend, fresh):
    tok = backend.tokenizer
    prompts = [tok.encode(q * k)[:200] for q, k in zip(QUESTIONS, (1, 3, 1, 2, 8))]  # 4 to 200 tokens
    alone = [greedy_logits(fresh(), ids, 12) for ids in prompts]
    engine = Engine(backend, slots=3, chunk=16, step_tokens=32)  # fewer slots than requests: some wait
    got: dict[int, list[torch.Tensor]] = {}
    started = [threading.Event() for _ in prompts]

    def worker(i: int) -> None:
        if i:  # admitted at different times: after the previous one has begun decoding
            started[i - 1].wait(30)
        with engine.slot() as s:
            logits = [s.prefill(prompts[i])]
            started[i].set()
            for _ in range(12):
                time.sleep(0.005)  # a consumer that takes its time: the next request's prompt comes meanwhile
                logits.append(s.decode(int(logits[-1].argmax())))
        got[i] = logits

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert engine.stats["steps"] < sum(len(p) // 16 + 13 for p in prompts)  # rows really shared steps
    for i in range(len(prompts)):
        assert all(torch.equal(a, b) for a, b in zip(alone[i], got[i])), f"request {i} differs from alone"
    # the same through generate_stream: replies equal to the batch-1 backend's
    replies: dict[int, Reply] = {}

    def chat(i: int) -> None:
        with engine.slot() as s:
            replies[i] = run(s, ask(QUESTIONS[i]))

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
        time.sleep(0.01 * len(threads))
    for t in threads:
        t.join(120)
    for i, q in enumerate(QUESTIONS):
        ref = run(fresh(), ask(q))
        assert replies[i].text == ref.text and replies[i].completion_tokens == ref.completion_tokens
    engine.close()


def test_cancelling_frees_the_slot_at_once(backend):
    engine = Engine(backend, slots=2, chunk=8, step_tokens=8)
    tok = backend.tokenizer
    stop = threading.Event()
    errors: list[BaseException] = []
    first = engine.slot(should_stop=stop.is_set)
    second = engine.slot()
    assert engine.free_slots == 0
    with pytest.raises(TimeoutError):
        engine.slot(timeout=0.1)

    def decode_forever(s) -> None:
        try:
            logits = s.prefill(tok.encode("What is a closure?"))
            for _ in range(200):  # ~2 s: a slow consumer
                time.sleep(0.01)
                logits = s.decode(int(logits.argmax()))
        except Cancelled as e:
            errors.append(e)

    t = threading.Thread(target=decode_forever, args=(first,))
    t.start()
    time.sleep(0.2)
    stop.set()  # the client left: the engine drops it at its next step, whatever the thread is doing
    t.join(5)
    assert not t.is_alive() and errors and engine.free_slots == 1
    third = engine.slot(timeout=1)  # a waiting request gets the freed slot
    assert run(third, ask("hi")).completion_tokens > 0
    third.release()
    second.release()
    # stopped in the middle of a long (chunked) prompt: the prefill call ends there, the slot is free
    long_prompt = tok.encode(QUESTIONS[4] * 8)[:240]
    mid = engine.slot(should_stop=lambda: mid.pos >= 16)
    with pytest.raises(Cancelled):
        mid.prefill(long_prompt)
    assert mid.pos < 16 + 8 + mid.cached_tokens < len(long_prompt) and engine.free_slots == 2
    engine.close()


def test_a_long_prompt_is_chunked_and_does_not_stall_decoding(backend):
    # gather=1 s: a step waits for a request it served to come back (up to 1 s), so on a loaded machine
    # the decoder's thread need not win a race against 20 one-millisecond steps
    engine = Engine(backend, slots=2, chunk=8, step_tokens=8, gather=1.0)
    tok = backend.tokenizer
    stamps: list[float] = []
    ready, started, done = threading.Event(), threading.Event(), threading.Event()

    def decoder() -> None:
        with engine.slot() as s:
            logits = s.decode(int(s.prefill(tok.encode("hi")).argmax()))  # served once: a step waits for it
            ready.set()
            started.wait(30)
            while not done.is_set() and len(stamps) < 200:
                logits = s.decode(int(logits.argmax()))
                stamps.append(time.perf_counter())

    t = threading.Thread(target=decoder)
    t.start()
    long_prompt = tok.encode(QUESTIONS[4] * 8)[:160]  # 20 chunks of 8
    assert len(long_prompt) == 160
    assert ready.wait(30)
    with engine.slot() as s:
        t0 = time.perf_counter()
        started.set()
        s.prefill(long_prompt)
        t1 = time.perf_counter()
    done.set()
    t.join(10)
    during = sum(t0 < x < t1 for x in stamps)
    assert during >= 10, f"only {during} decode steps of the other request ran during a 20-chunk prefill"
    engine.close()


def test_prompt_cache_reuses_prefixes_and_changes_nothing(backend, fresh):
    engine = Engine(backend, slots=2, chunk=32, step_tokens=64)
    with engine.slot() as s:
        first = run(s, ask(QUESTIONS[0]))
        assert s.cached_tokens == 0
    followup = [*ask(QUESTIONS[0]), {"role": "assistant", "content": first.text}, *ask("And a generator?")]
    with engine.slot() as s:
        again = run(s, followup)  # the earlier turn's prompt is reused
        turn_cached = s.cached_tokens
    assert again.text == run(fresh(), followup).text
    assert turn_cached > 20 and turn_cached < again.prompt_tokens
    assert again.cached_tokens == turn_cached  # what the API reports as cached_tokens
    with engine.slot() as a, engine.slot() as b:
        run(a, ask(QUESTIONS[3]))  # a's row now holds another prompt; b takes the older row
        other = run(b, ask(QUESTIONS[1]))  # shares the system prompt with both
        assert 10 < b.cached_tokens < other.prompt_tokens
    assert other.text == run(fresh(), ask(QUESTIONS[1])).text
    engine.close()
    # the batch-1 backend has the same cache for a chat's turns
    b1 = fresh()
    run(b1, ask(QUESTIONS[0]))
    assert run(b1, followup).text == again.text and b1.cached_tokens == turn_cached


def test_a_prompt_sharing_only_the_system_prompt_keeps_other_cached_prompts(backend):
    """Questions asked one after another each keep their row while an empty one is free, so asking one again
    reuses all of it, not only the system prompt it shares with the others."""
    engine = Engine(backend, slots=3, chunk=32, step_tokens=64)
    first = []
    for q in QUESTIONS[:3]:
        with engine.slot() as s:
            first.append(run(s, ask(q)))
            assert 0 <= s.cached_tokens < first[-1].prompt_tokens - 1
    for q, reply in zip(QUESTIONS[:3], first):
        with engine.slot() as s:
            assert run(s, ask(q)).text == reply.text
            assert s.cached_tokens == reply.prompt_tokens - 1  # only the last token runs again: its logits
    with engine.slot() as s:  # every row holds a prompt: the least recently used one gives way
        run(s, ask(QUESTIONS[3]))
        assert s.row == 0
    engine.close()


# ----------------------------------------------------------------------------- through the HTTP server

def test_concurrent_streaming_clients_get_their_greedy_replies(backend, fresh):
    import httpx

    from runtime_python.server import create_app
    from test_server import ServerThread

    questions = QUESTIONS * 2  # 10 clients, 4 slots: six wait in the queue
    expected = [run(fresh(), ask(q)).text for q in questions]
    got: dict[int, tuple[str, dict]] = {}

    def stream(i: int, url: str) -> None:
        body = {"messages": ask(questions[i]), "stream": True, "temperature": 0, "max_tokens": GREEDY.max_new_tokens,
                "retrieval": False, "stream_options": {"include_usage": True}}
        text, usage = [], {}
        with httpx.Client(timeout=60) as c, c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                assert "error" not in ev, ev
                text += [c["delta"].get("content", "") for c in ev["choices"]]
                usage = ev.get("usage") or usage
        got[i] = "".join(text), usage

    with ServerThread(create_app(backend, None, max_queue=16, slots=4)) as s:
        threads = [threading.Thread(target=stream, args=(i, s.url)) for i in range(len(questions))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        health = httpx.get(f"{s.url}/health").json()
        stream(0, s.url)  # its row may have gone to later prompts: ask once to have it cached, then again
        stream(0, s.url)
        again = got[0][1]
    assert [got[i][0] for i in range(len(questions))] == expected  # got[0] is the repeat: the same text
    assert health["completed"] == len(questions) and health["slots"] == 4 and health["running"] == 0
    # only the first wave (4 slots) can find nothing cached; the rest find the system prompt at least
    cached = [(u["prompt_tokens_details"]["cached_tokens"], u["prompt_tokens"]) for _, u in got.values()]
    assert sum(c == 0 for c, _ in cached) <= 4 and all(c < n for c, n in cached)
    # a question asked again right after finds all its prompt but the last token cached
    assert again["prompt_tokens_details"]["cached_tokens"] == again["prompt_tokens"] - 1


def test_a_full_queue_says_when_to_retry(backend):
    import httpx

    from runtime_python.server import create_app
    from test_server import ServerThread, SlowBackend, _long_body, long_seed

    seed = long_seed(backend)
    with ServerThread(create_app(SlowBackend(backend), None, max_queue=0)) as s:  # a wrapper: one at a time
        with httpx.Client(timeout=30) as c, c.stream("POST", f"{s.url}/v1/chat/completions",
                                                     json=_long_body(seed)) as r:
            assert r.status_code == 200
            busy = httpx.post(f"{s.url}/v1/chat/completions", json=_long_body(seed, stream=False), timeout=30)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
