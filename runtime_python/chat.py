"""Chat: messages + retrieval -> prompt ids -> streamed reply with citations (shared by terminal and web).

Design choices:
- The prompt comes from `source.prompt.build_prompt`, the one prompt builder (training's layout,
  special-token spellings defused, the token budget). Passages are
  `prepare_context(index.search(retrieval_query(messages), k))` (the latest user message and the one before it), clipped exactly as in training.
- A reply ends at <|end|> or </s>, and also at <s> or any other chat-role token (<|user|> etc.):
  those mean the model started a new turn, which is never reply text.
- Citations: `Reply.citations` holds the sources the reply cites as [n] or [1, 2] (parsed by
  `source.prompt.cited_numbers`, as in evaluation and on the site), numbered as in the prompt, in
  number order; none cited -> empty list, so a UI never shows a source the answer did not use.
  Every source that was shown to the model is in `Reply.sources`.
- `generate_stream` is stateless (the HTTP API calls it per request): text deltas, then one
  Reply. "".join(deltas) == Reply.text. `should_stop()` is polled before every token; stopping
  gives finish_reason "stop" and the partial text. Reply.seconds is the whole request (retrieval,
  prefill, decode); tokens_per_second = completion_tokens / seconds, the speed the user saw.
- Two optional extras for the HTTP API, both outside the token loop's logic: `prompt_ids` replaces
  the chat prompt with ready ids (a raw completion: no template, no retrieval, and the reply
  continues the prompt, so a leading space is kept), and `on_token(id, logits)` sees every reply
  token with the raw logits it was sampled from (the API's logprobs), before its text is yielded.
- `ChatSession` keeps the history for the terminal; a turn is recorded when its stream ends, also
  when it is stopped or closed early (with the partial reply), not when the prompt was rejected.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch

from source.prompt import build_prompt, cited_numbers, retrieval_query
from source.sft_data import DEFAULT_SYSTEM_PROMPT, prepare_context
from runtime_python.backends import ChatBackend
from runtime_python.generation import (GenerationConfig, IncrementalDetokenizer, StopChecker, make_generator,
                                       sample_next)


@dataclass
class Citation:
    number: int  # the [n] of the prompt's context block
    id: str
    title: str
    source: str
    text: str  # the passage as shown to the model (clipped)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Reply:
    text: str
    citations: list[Citation]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end token, stop sequence, should_stop) or "length"
    seconds: float
    tokens_per_second: float
    sources: list[Citation] = field(default_factory=list)  # every passage the prompt showed
    cached_tokens: int = 0  # prompt tokens whose K/V came from the backend's prompt cache

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- generation

def generate_stream(backend: ChatBackend, messages: list[dict], gen: GenerationConfig, index=None,
                    retrieval: bool = True, k: int = 3, system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                    should_stop: Callable[[], bool] | None = None, prompt_ids: list[int] | None = None,
                    on_token: Callable[[int, torch.Tensor], None] | None = None) -> Iterator[str | Reply]:
    """Text deltas of the reply, then one Reply. Stateless: `messages` is the whole conversation
    (ignored when `prompt_ids` is given)."""
    t0 = time.perf_counter()
    gen = gen.validate()
    tok = backend.tokenizer
    if prompt_ids is None:
        question = retrieval_query(messages, system_prompt)
        passages = prepare_context(index.search(question, k)) if index is not None and retrieval and k > 0 else []
        prompt = build_prompt(tok, messages, passages, system_prompt, gen.max_new_tokens, backend.max_seq_len)
        ids, shown = prompt.ids, prompt.passages
    else:
        if len(prompt_ids) + gen.max_new_tokens > backend.max_seq_len:
            raise ValueError(f"the prompt ({len(prompt_ids)} tokens) + max_new_tokens ({gen.max_new_tokens}) "
                             f"exceed the model's context of {backend.max_seq_len} tokens")
        ids, shown = list(prompt_ids), []
    # <|end|> and </s> end a reply; <s> or another chat-role token means the model began a new turn
    end_ids = {tok.eos_id, tok.bos_id, *tok.special_ids.values()} - {None}  # bos_id is None in some HF tokenizers
    rng = make_generator(gen.seed)
    detok, stops = IncrementalDetokenizer(tok, continuation=prompt_ids is not None), StopChecker(gen.stop)
    out: list[int] = []
    parts: list[str] = []
    finish = "length"
    logits = backend.prefill(ids)
    cached = getattr(backend, "cached_tokens", 0)  # the ChatBackends that have a prompt cache report it
    for step in range(gen.max_new_tokens):
        if should_stop is not None and should_stop():
            finish = "stop"
            break
        next_id = sample_next(logits, gen, out, rng)
        if next_id in end_ids:
            finish = "stop"
            break
        out.append(next_id)
        if on_token is not None:
            on_token(next_id, logits)
        delta = stops.push(detok.push(next_id))
        if delta:
            parts.append(delta)
            yield delta
        if stops.stopped:
            finish = "stop"
            break
        if step + 1 < gen.max_new_tokens:  # no forward pass for a token nobody will sample
            logits = backend.decode(next_id)
    tail = stops.push(detok.flush()) + stops.flush()  # held-back text that did not become a stop
    if tail:
        parts.append(tail)
        yield tail
    text = "".join(parts)
    sources = [Citation(i, p.get("id", ""), p.get("title", ""), p.get("source", ""), p.get("text", ""))
               for i, p in enumerate(shown, 1)]
    cited = set(cited_numbers(text))
    seconds = time.perf_counter() - t0
    yield Reply(text=text, citations=[c for c in sources if c.number in cited], prompt_tokens=len(ids),
                completion_tokens=len(out), finish_reason=finish, seconds=seconds,
                tokens_per_second=len(out) / seconds if seconds > 0 else 0.0, sources=sources,
                cached_tokens=cached)


class ChatSession:
    """A conversation for the terminal: history, system prompt and retrieval settings."""

    def __init__(self, backend: ChatBackend, index=None, system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                 retrieval: bool = True, k: int = 3) -> None:
        self.backend, self.index, self.system_prompt = backend, index, system_prompt
        self.retrieval, self.k = retrieval, k
        self.history: list[dict] = []  # {"role": "user" | "assistant", "content"}
        self.last_citations: list[Citation] = []
        self.last_reply: Reply | None = None

    def reset(self) -> None:
        self.history.clear()
        self.last_citations, self.last_reply = [], None

    def set_system(self, text: str) -> None:
        if not isinstance(text, str):
            raise ValueError("the system prompt must be a string")
        self.system_prompt = text

    def stream(self, user_text: str, gen: GenerationConfig,
               should_stop: Callable[[], bool] | None = None) -> Iterator[str | Reply]:
        """Like generate_stream, over the history plus `user_text`; records the turn when it ends."""
        messages = [*self.history, {"role": "user", "content": user_text}]
        parts: list[str] = []
        started, reply = False, None
        try:
            for item in generate_stream(self.backend, messages, gen, index=self.index, retrieval=self.retrieval,
                                        k=self.k, system_prompt=self.system_prompt, should_stop=should_stop):
                started = True
                if isinstance(item, Reply):
                    reply = item
                else:
                    parts.append(item)
                yield item
        finally:  # also on close() / an exception in the consumer: keep what the user saw
            if started or reply is not None:
                self.history += [{"role": "user", "content": user_text},
                                 {"role": "assistant", "content": reply.text if reply else "".join(parts)}]
            if reply is not None:
                self.last_reply, self.last_citations = reply, reply.citations
            elif started:
                self.last_reply, self.last_citations = None, []
