"""Chat: messages + retrieval -> prompt ids -> streamed reply with citations (shared by terminal and web).

Design choices:
- Prompts are laid out by `source.sft_data.to_chat_messages` and encoded by `Tokenizer.encode_chat`,
  the very functions SFT training uses: system, earlier turns (their [n] markers stripped), the
  context block of numbered sources, the latest user turn, then <|assistant|>. Passages come from
  `prepare_context(index.search(latest user message, k))`, clipped exactly as in training.
- System messages in `messages` (the OpenAI API sends them) replace `system_prompt`; several are
  joined with a blank line. The conversation must end with a user message.
- Token budget (`build_prompt`): system + context + history + latest user + max_new_tokens never
  exceed the window. Costs are counted per message once (encode_chat encodes each message on its
  own, so lengths add up exactly), then, in order: drop the oldest exchanges (a user turn with the
  replies after it, so the history never opens with a reply), shrink the passages (clip to 70%
  per round, at least 60 characters, then drop the last-ranked), and finally cut the start of
  the latest user turn (questions usually end a long paste). The system prompt is never cut;
  ValueError only when it alone, with max_new_tokens, cannot fit.
- A reply ends at <|end|> or </s>, and also at <s> or any other chat-role token (<|user|> etc.):
  those mean the model started a new turn, which is never reply text.
- Citations: `Reply.citations` holds the sources the reply cites as [n] (or [1, 2]), numbered as in
  the prompt, in number order; none cited -> empty list, so a UI never shows a source the answer did
  not use. Every source that was shown to the model is in `Reply.sources`.
- `generate_stream` is stateless (the HTTP API calls it per request): text deltas, then one
  Reply. "".join(deltas) == Reply.text. `should_stop()` is polled before every token; stopping
  gives finish_reason "stop" and the partial text. Reply.seconds is the whole request (retrieval,
  prefill, decode); tokens_per_second = completion_tokens / seconds, the speed the user saw.
- `ChatSession` keeps the history for the terminal; a turn is recorded when its stream ends, also
  when it is stopped or closed early (with the partial reply), not when the prompt was rejected.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

from source.sft_data import DEFAULT_SYSTEM_PROMPT, clip_text, prepare_context, to_chat_messages
from source.tokenizer import SPECIAL_TOKENS, Tokenizer, format_context
from runtime_python.backends import ChatBackend
from runtime_python.generation import (GenerationConfig, IncrementalDetokenizer, StopChecker, make_generator,
                                       sample_next)

MIN_PASSAGE_CHARS = 60
_CITE = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
_SPECIAL = re.compile("|".join(map(re.escape, sorted(SPECIAL_TOKENS, key=len, reverse=True))))


def defuse_special_tokens(text: str) -> str:
    """Message text that spells a special token ("<|end|>", "<|system|>", "<s>") would be encoded as
    that token (the tokenizer, like HF's, matches them anywhere), so a user could forge turns or a
    system prompt. Its "<" becomes "\u2039" (a look-alike): the text stays readable and encodes as text.
    web_static/prompt.js does the same, so the browser's prompt ids stay equal to these."""
    return _SPECIAL.sub(lambda m: "\u2039" + m.group()[1:], text)


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

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- prompt + budget

def _split(messages: list[dict], system_prompt: str) -> tuple[str, list[dict], str]:
    """(system text, earlier turns, latest user text); ValueError for malformed messages."""
    system, turns = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}]: must be an object with a string content")
        if m.get("role") == "system":
            system.append(defuse_special_tokens(m["content"]))
        elif m.get("role") in ("user", "assistant"):
            turns.append({"role": m["role"], "content": defuse_special_tokens(m["content"])})
        else:
            raise ValueError(f"messages[{i}].role: {m.get('role')!r} is not one of system, user, assistant")
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("the conversation must end with a user message")
    return "\n\n".join(system) if system else system_prompt, turns[:-1], turns[-1]["content"]


def _cost(tokenizer: Tokenizer, content: str) -> int:
    return len(tokenizer.encode(content)) + 2  # <|role|> content <|end|>


def _fit(tokenizer: Tokenizer, messages: list[dict], passages: list[dict], system_prompt: str,
         max_new_tokens: int, max_seq_len: int) -> tuple[list[int], list[dict], list[dict]]:
    """build_prompt, also returning the passages actually shown (possibly clipped or fewer)."""
    system, history, user = _split(messages, system_prompt)
    limit = max_seq_len - max_new_tokens  # what the prompt may take
    fixed = 2 + _cost(tokenizer, system) + _cost(tokenizer, "")  # <s>, <|assistant|>, system, empty user turn
    if fixed + 1 > limit:
        raise ValueError(f"cannot fit a prompt: the system prompt takes {fixed - 6} tokens and max_new_tokens is "
                         f"{max_new_tokens}, but the model's window is {max_seq_len} tokens; lower max_new_tokens")
    # history costs after the training layout (which strips [n] markers from earlier replies)
    laid_out = to_chat_messages({"messages": [{"role": "system", "content": system}, *history,
                                              {"role": "user", "content": user}]}, system)
    costs = [_cost(tokenizer, m["content"]) for m in laid_out[1:-1]]
    user_cost = _cost(tokenizer, user) - 2
    ctx = [dict(p) if isinstance(p, dict) else p.to_dict() for p in passages]  # prepare_context dicts or Passages

    def ctx_cost() -> int:
        return _cost(tokenizer, format_context(ctx)) if ctx else 0

    start, total = 0, fixed + sum(costs) + ctx_cost() + user_cost
    while total > limit and start < len(history):  # 1. the oldest exchange goes first
        total -= costs[start]
        start += 1
        while start < len(history) and history[start]["role"] == "assistant":
            total -= costs[start]
            start += 1
    while total > limit and ctx:  # 2. shrink the passages, then drop the last-ranked
        before = ctx_cost()
        longest = max(len(p["text"]) for p in ctx)
        if longest > MIN_PASSAGE_CHARS:
            cap = max(MIN_PASSAGE_CHARS, int(longest * 0.7))
            ctx = [{**p, "text": clip_text(p["text"], cap)} for p in ctx]
        else:
            ctx.pop()
        total += ctx_cost() - before
    if total > limit:  # 3. keep the end of the latest user turn
        room = limit - (total - user_cost)
        user = _keep_end(tokenizer, user, room)
    kept = to_chat_messages({"messages": [{"role": "system", "content": system}, *history[start:],
                                          {"role": "user", "content": user}], "context": ctx}, system)
    ids, _ = tokenizer.encode_chat(kept, add_generation_prompt=True)
    if len(ids) > limit:  # the arithmetic above is exact; this guards the invariant, not a case
        raise ValueError(f"prompt of {len(ids)} tokens exceeds the budget of {limit}")
    return ids, kept, ctx


def _keep_end(tokenizer: Tokenizer, text: str, room: int) -> str:
    """The longest suffix of `text` that encodes to at most `room` tokens (binary search on the start)."""
    lo, hi = 0, len(text)  # text[hi:] == "" always fits
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.encode(text[mid:])) <= room:
            hi = mid
        else:
            lo = mid + 1
    return text[lo:]


def build_prompt(tokenizer: Tokenizer, messages: list[dict], context_passages: list[dict], system_prompt: str,
                 max_new_tokens: int, max_seq_len: int) -> tuple[list[int], list[dict]]:
    """(prompt ids, the laid-out messages they encode) within the token budget (module docstring).
    The messages are exactly what `encode_chat` was given: system, kept turns, context, user."""
    ids, kept, _ = _fit(tokenizer, messages, context_passages, system_prompt, max_new_tokens, max_seq_len)
    return ids, kept


def cited_numbers(text: str) -> list[int]:
    """The source numbers a reply cites: "[2] and [1, 3]" -> [1, 2, 3]."""
    return sorted({int(n) for group in _CITE.findall(text) for n in group.split(",")})


# ----------------------------------------------------------------------------- generation

def generate_stream(backend: ChatBackend, messages: list[dict], gen: GenerationConfig, index=None,
                    retrieval: bool = True, k: int = 3, system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                    should_stop: Callable[[], bool] | None = None) -> Iterator[str | Reply]:
    """Text deltas of the reply, then one Reply. Stateless: `messages` is the whole conversation."""
    t0 = time.perf_counter()
    gen = gen.validate()
    tok = backend.tokenizer
    _, _, question = _split(messages, system_prompt)
    passages = prepare_context(index.search(question, k)) if index is not None and retrieval and k > 0 else []
    ids, _, shown = _fit(tok, messages, passages, system_prompt, gen.max_new_tokens, backend.max_seq_len)
    # <|end|> and </s> end a reply; <s> or another chat-role token means the model began a new turn
    end_ids = {tok.eos_id, tok.bos_id, *tok.special_ids.values()}
    rng = make_generator(gen.seed)
    detok, stops = IncrementalDetokenizer(tok), StopChecker(gen.stop)
    out: list[int] = []
    parts: list[str] = []
    finish = "length"
    logits = backend.prefill(ids)
    for step in range(gen.max_new_tokens):
        if should_stop is not None and should_stop():
            finish = "stop"
            break
        next_id = sample_next(logits, gen, out, rng)
        if next_id in end_ids:
            finish = "stop"
            break
        out.append(next_id)
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
                tokens_per_second=len(out) / seconds if seconds > 0 else 0.0, sources=sources)


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
