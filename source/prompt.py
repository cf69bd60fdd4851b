"""The prompt: messages + passages -> prompt ids within the token budget, and the citations of a reply.

The one prompt builder: the runtime (`runtime_python.chat`), evaluation (`source.evaluate`), the
export gates and `builder sft`'s samples all call `build_prompt`; web_static/prompt.js is its
JavaScript port for the site, checked id for id against it in tests/test_prompt.py.

Design choices:
- Layout is training's: `source.sft_data.to_chat_messages` lays the conversation out (system, earlier
  turns with their [n] markers stripped, the context block of numbered sources, the latest user
  turn) and `Tokenizer.encode_chat` encodes it, then <|assistant|>. Passages are taken as given:
  callers clip retrieval hits with `prepare_context`, exactly as the training examples were clipped.
- System messages in `messages` (the OpenAI API sends them) replace `system_prompt`; several are
  joined with a blank line. The conversation must end with a user message; ValueError otherwise.
- Text that spells a special token ("<|end|>", "<s>") is defused: its "<" becomes U+2039, so neither a
  user nor an indexed document can forge turns or a system prompt. Messages are defused here; passage
  titles and texts where they are laid out (`format_context`, which training's examples go through
  too), so the shown passages keep their text and training sees what serving sends.
- Token budget: system + context + history + latest user + max_new_tokens never exceed the window.
  Costs are counted per message once (encode_chat encodes each message on its own, so lengths add up
  exactly), then, in order: drop the oldest exchanges (a user turn with the replies after it, so the
  history never opens with a reply), shrink the passages (clip to 70% per round, never below
  MIN_PASSAGE_CHARS, then drop the last-ranked), and finally cut the start of the latest user turn
  (questions usually end a long paste). The system prompt is never cut; ValueError only when it
  alone, with max_new_tokens, cannot fit. With a Hugging Face model's own chat template
  (`source.hf_tokenizer`) a message costs more than <|role|> + <|end|> and the count is an
  estimate: if the encoded prompt is over, the next budget is that layout's count less the excess
  (not the budget less the excess: a layout counted well under its budget would come out the same
  again), and the layout is redone (FIT_ROUNDS at most). Ours is exact, so its first round always fits.
- Citations: a reply cites source n as "[n]" or in a group "[1, 3]". Parsing is ASCII-only (digits
  0-9, at most 9 per number; spaces, tabs and newlines around the commas), so the browser's regular
  expressions, whose \\d and \\s differ from Python's, find exactly the same numbers.
- The JS port counts string lengths in code points like Python, and strips Python's whitespace set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from source.sft_data import clip_text, to_chat_messages
from source.tokenizer import ChatTokenizer, defuse_special_tokens, format_context

MIN_PASSAGE_CHARS = 60  # a passage is clipped no shorter than this, then dropped
FIT_ROUNDS = 3  # layouts tried when a model's own chat template costs more than the per-message count
_CITE = re.compile(r"\[([0-9]{1,9}(?:[ \t\n\r\f\v]*,[ \t\n\r\f\v]*[0-9]{1,9})*)\]")


@dataclass
class Prompt:
    ids: list[int]        # <s> ... <|assistant|>: what the model is fed
    messages: list[dict]  # what encode_chat encoded: system, kept turns, context, latest user (maybe cut)
    passages: list[dict]  # the passages shown, in [n] order: possibly clipped, possibly fewer than given
    question: str         # the latest user message, whole and defused: what retrieval searches for


def split_messages(messages: list[dict], system_prompt: str) -> tuple[str, list[dict], str]:
    """(system text, earlier turns, latest user text), all defused; ValueError for malformed messages."""
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


def retrieval_query(messages: list[dict], system_prompt: str = "") -> str:
    """What retrieval searches for: the latest user message, then the user message before it. A
    follow-up ("and how do i read it back?") names its topic only in the turn it follows; a question
    that names its own topic still ranks its own words first, since they come first."""
    _, history, question = split_messages(messages, system_prompt)
    earlier = [t["content"] for t in history if t["role"] == "user"]
    return f"{question}\n{earlier[-1]}" if earlier else question


def _cost(tokenizer: ChatTokenizer, content: str) -> int:
    return len(tokenizer.encode(content)) + 2  # <|role|> content <|end|>


def _keep_end(tokenizer: ChatTokenizer, text: str, room: int) -> str:
    """The longest suffix of `text` that encodes to at most `room` tokens (binary search on the start)."""
    lo, hi = 0, len(text)  # text[hi:] == "" always fits
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.encode(text[mid:])) <= room:
            hi = mid
        else:
            lo = mid + 1
    return text[lo:]


def build_prompt(tokenizer: ChatTokenizer, messages: list[dict], passages: list, system_prompt: str,
                 max_new_tokens: int, max_seq_len: int) -> Prompt:
    """The prompt for `messages` (system/user/assistant dicts ending with a user turn) and `passages`
    (dicts or retrieval Passages, in rank order) that leaves `max_new_tokens` of `max_seq_len` free."""
    system, history, user = split_messages(messages, system_prompt)
    limit = max_seq_len - max_new_tokens  # what the prompt may take
    budget = limit
    for _ in range(FIT_ROUNDS):
        kept, ctx, ids, counted = _fit(tokenizer, system, history, user, passages, budget, max_new_tokens,
                                       max_seq_len)
        if len(ids) <= limit:
            return Prompt(ids=ids, messages=kept, passages=ctx, question=user)
        budget = min(budget, counted) - (len(ids) - limit)  # its own template cost more than the count
    # with our tokenizer the count is exact and the first round fits; this guards the invariant
    raise ValueError(f"prompt of {len(ids)} tokens exceeds the budget of {limit}")


def _fit(tokenizer: ChatTokenizer, system: str, history: list[dict], user: str, passages: list, limit: int,
         max_new_tokens: int, max_seq_len: int) -> tuple[list[dict], list[dict], list[int], int]:
    """(messages, passages, ids, their per-message count) laid out to take at most `limit` tokens by that count
    (the count is over `limit` only when the latest user turn was cut to fit)."""
    fixed = 2 + _cost(tokenizer, system) + _cost(tokenizer, "")  # <s>, <|assistant|>, system, empty user turn
    if fixed + 1 > limit:
        raise ValueError(f"cannot fit a prompt: the system prompt takes {fixed - 6} tokens and max_new_tokens is "
                         f"{max_new_tokens}, but the model's window is {max_seq_len} tokens; lower max_new_tokens")
    # history costs after the training layout (which strips [n] markers from earlier replies)
    laid_out = to_chat_messages({"messages": [{"role": "system", "content": system}, *history,
                                              {"role": "user", "content": user}]}, system)
    costs = [_cost(tokenizer, m["content"]) for m in laid_out[1:-1]]
    user_cost = _cost(tokenizer, user) - 2
    ctx = [dict(p) if isinstance(p, dict) else p.to_dict() for p in passages]

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
        user = _keep_end(tokenizer, user, limit - (total - user_cost))
    kept = to_chat_messages({"messages": [{"role": "system", "content": system}, *history[start:],
                                          {"role": "user", "content": user}], "context": ctx}, system)
    ids, _ = tokenizer.encode_chat(kept, add_generation_prompt=True)
    return kept, ctx, ids, total


def cited_numbers(text: str) -> list[int]:
    """The source numbers a reply cites, sorted, each once: "[2] and [1, 3]" -> [1, 2, 3]."""
    return sorted({int(n) for group in _CITE.findall(text) for n in group.split(",")})
