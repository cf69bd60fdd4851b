"""The API's answers: OpenAI's response shapes (usage, both logprobs shapes) and the SSE streams.

Design choices:
- A job's items are text deltas, `[TokenLogprob]` lists (each just before the text of its tokens)
  and one final Reply; a stream chunk carries the logprobs of the tokens behind its text.
- Token strings are vocabulary pieces ("▁" as a space; a lone byte of a split character reads as
  U+FFFD, `bytes` is exact); a chat reply's first token drops sentencepiece's dummy-prefix space as
  the reply text does, so the tokens' bytes join up to the text.
- Once an SSE response has started, an error (a timeout, a bug) is sent in-band as
  `data: {"error": ...}` followed by `[DONE]`, the way OpenAI does; the job is stopped however the
  stream ends, so a dropped client frees the model.
"""

from __future__ import annotations

import json
import threading
from typing import Any, AsyncIterator

from fastapi.responses import StreamingResponse

from runtime_python.api_models import ApiError
from runtime_python.chat import Reply
from runtime_python.generation import TokenLogprob

Item = str | Reply | list[TokenLogprob]


# ----------------------------------------------------------------------------- response shapes

def citations(reply: Reply | None) -> list[dict]:
    if reply is None:
        return []
    return [{"number": c.number, "id": c.id, "title": c.title, "source": c.source} for c in reply.citations]


def usage(replies: list[Reply]) -> dict:
    """OpenAI's usage; the prompt counts once however many choices were drawn from it."""
    prompt, completion = replies[0].prompt_tokens, sum(r.completion_tokens for r in replies)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": replies[0].cached_tokens},  # from the prompt cache
            "completion_tokens_details": {"reasoning_tokens": 0}}


def chat_logprobs(scored: list[TokenLogprob]) -> dict:
    def one(t: TokenLogprob) -> dict:
        return {"token": t.text, "logprob": t.logprob, "bytes": list(t.bytes)}

    return {"content": [{**one(t), "top_logprobs": [one(a) for a in t.top]} for t in scored], "refusal": None}


def legacy_logprobs(scored: list[TokenLogprob], offset: int) -> dict:
    """The completions shape; text_offset counts characters from the prompt's start, as OpenAI's."""
    offsets = []
    for t in scored:
        offsets.append(offset)
        offset += len(t.text)
    return {"tokens": [t.text for t in scored], "token_logprobs": [t.logprob for t in scored],
            "top_logprobs": [{a.text: a.logprob for a in t.top} for t in scored], "text_offset": offsets}


# ----------------------------------------------------------------------------- streaming

def stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _events(items: AsyncIterator[Item], stop: threading.Event) -> AsyncIterator[tuple[str | Reply, list[TokenLogprob]]]:
    """(text delta or Reply, the logprobs of its tokens); errors once headers are sent go in-band,
    the way OpenAI does, and however the stream ends the model is freed."""
    scored: list[TokenLogprob] = []
    try:
        async for item in items:
            if isinstance(item, list):
                scored += item
            elif isinstance(item, Reply) or item:
                yield item, scored
                scored = []
    except Exception as e:  # ApiError: the request timed out
        if not isinstance(e, ApiError):
            e = ApiError(500, str(e), None, None, "invalid_request_error" if isinstance(e, ValueError) else "server_error")
        yield e, []  # type: ignore[misc]
    finally:
        stop.set()


async def chat_sse(items: AsyncIterator[Item], stop: threading.Event, rid: str, created: int, model: str,
                    include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: dict | None, finish: str | None = None, logprobs: dict | None = None, **extra: Any) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]
        return _data({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                      "choices": choices, **extra})

    yield chunk({"role": "assistant", "content": ""})
    async for item, scored in _events(items, stop):
        lp = chat_logprobs(scored) if scored else None
        if isinstance(item, ApiError):
            yield _data(item.body())
        elif isinstance(item, Reply):
            yield chunk({}, item.finish_reason, lp, citations=citations(item),
                        tokens_per_second=round(item.tokens_per_second, 2))
            if include_usage:
                yield chunk(None, usage=usage([item]))  # OpenAI's stream_options shape
        else:
            yield chunk({"content": item}, None, lp)
    yield "data: [DONE]\n\n"


async def completion_sse(items: AsyncIterator[Item], stop: threading.Event, rid: str, created: int, model: str,
                          include_usage: bool, top: int | None, offset: int) -> AsyncIterator[str]:
    def chunk(text: str | None, finish: str | None = None, scored: list | None = None, **extra: Any) -> str:
        lp = legacy_logprobs(scored or [], offset) if top is not None and text is not None else None
        choices = [] if text is None else [{"index": 0, "text": text, "finish_reason": finish, "logprobs": lp}]
        return _data({"id": rid, "object": "text_completion", "created": created, "model": model,
                      "choices": choices, **extra})

    async for item, scored in _events(items, stop):
        if isinstance(item, ApiError):
            yield _data(item.body())
        elif isinstance(item, Reply):
            yield chunk("", item.finish_reason, scored)
            if include_usage:
                yield chunk(None, usage=usage([item]))
        else:
            yield chunk(item, None, scored)
        offset += sum(len(t.text) for t in scored)
    yield "data: [DONE]\n\n"


