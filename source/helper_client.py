"""Helper-model SFT data: any OpenAI-compatible /chat/completions endpoint writes grounded Q&A pairs.

Design choices:
- Standard library only (urllib): one POST per passage, nothing to install, works with OpenAI, vLLM,
  llama.cpp, Ollama and LM Studio alike. The key comes from $SUPERMIX_HELPER_API_KEY (or none,
  for local servers); it is never written anywhere.
- The helper sees one corpus passage as source [1] and must reply with JSON {"question", "answer"}.
  The example it becomes is shaped like the offline ones: the runtime's top-3 retrieval hits for
  the question with the passage among them, and the answer's [1] renumbered to its position.
- Failures are bounded: 429, 5xx, timeouts and dropped connections are retried with exponential
  backoff (Retry-After honoured, capped); other HTTP errors stop at once (a wrong URL or key will
  not fix itself). A reply that is not the JSON asked for is re-asked, then skipped and counted.
- Resumable: each example is appended and flushed as soon as it exists, keyed by its passage's
  record id (meta.item); a rerun skips those items and continues with the same seeded order.
  Questions are deduplicated (normalized text) across runs.
- Entities of the held-out test split are never sent: their examples could not be used anyway.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from source.sft_data import (PASSAGE_CHARS, MAX_TOKENS, SHUFFLE_SHARE, clip_text, fit_budget, is_test_entity,
                             load_records)
from source.sft_templates import QA_BUILDERS, grounded_context

API_KEY_ENV = "SUPERMIX_HELPER_API_KEY"
SYSTEM = ("You write training data for a small assistant that answers questions from numbered sources. "
          "Reply with one JSON object and nothing else.")
PROMPT = """Source [1] ({title}):
{text}

Write one question a user could ask that source [1] answers, and a short answer (one or two \
sentences, under 60 words) that uses only facts from the source and ends with the citation [1].
Reply with JSON only: {{"question": "...", "answer": "..."}}"""


class HelperError(RuntimeError):
    """The endpoint failed for good: a wrong URL, model or key, or retries used up."""


class BadReply(ValueError):
    """The helper's reply was not the JSON we asked for."""


def endpoint(url: str) -> str:
    u = url.rstrip("/")
    return u if u.endswith("/chat/completions") else u + "/chat/completions"


def chat_completion(url: str, model: str, messages: list[dict], api_key: str | None = None,
                    timeout: float = 60.0, retries: int = 5, backoff: float = 1.0, max_wait: float = 60.0,
                    temperature: float = 0.7) -> str:
    """The assistant text of one /chat/completions call, retrying what may pass (429, 5xx, timeouts)."""
    body = json.dumps({"model": model, "messages": messages, "temperature": temperature}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    last = ""
    for attempt in range(retries + 1):
        wait = backoff * 2 ** attempt
        try:
            req = urllib.request.Request(endpoint(url), data=body, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
            try:
                return json.loads(raw)["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise BadReply(f"not a chat completion: {raw[:200]!r}") from None
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace")
            if e.code != 429 and e.code < 500:
                raise HelperError(f"{endpoint(url)}: HTTP {e.code} {e.reason}: {detail}") from None
            last = f"HTTP {e.code}"
            retry_after = e.headers.get("Retry-After", "")
            if retry_after.replace(".", "", 1).isdigit():
                wait = float(retry_after)
        except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError) as e:
            last = str(getattr(e, "reason", e))
        if attempt < retries:
            time.sleep(min(wait, max_wait))
    raise HelperError(f"{endpoint(url)}: gave up after {retries + 1} attempts ({last})")


def parse_reply(content: str) -> tuple[str, str]:
    """(question, answer) from the helper's text; BadReply when it is not what we asked for."""
    text = content.strip()
    if m := re.search(r"```(?:json)?\s*(.*?)```", text, re.S):
        text = m.group(1)
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise BadReply("no JSON object in the reply")
    try:
        obj = json.loads(text[start:end + 1])
    except json.JSONDecodeError as e:
        raise BadReply(f"invalid JSON ({e.msg})") from None
    q, a = (obj.get("question"), obj.get("answer")) if isinstance(obj, dict) else (None, None)
    if not isinstance(q, str) or not q.strip() or not isinstance(a, str) or not a.strip():
        raise BadReply('the reply needs non-empty "question" and "answer" strings')
    q, a = " ".join(q.split()), " ".join(a.split())
    if len(q) > 300 or len(a.split()) > 100:
        raise BadReply("question or answer too long")
    if re.search(r"\[(?!1\])\d+\]", a):
        raise BadReply("the answer cites a source other than [1]")
    if "[1]" not in a:
        raise BadReply("the answer does not cite [1]")
    return q, a


def normalize_question(q: str) -> str:
    return " ".join(re.findall(r"\w+", q.lower()))


def _read_done(path: Path) -> tuple[set[str], set[str], int]:
    """Items and normalized questions already in the output file, and its example count."""
    items, questions, n = set(), set(), 0
    if not path.is_file():
        return items, questions, n
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                ex = json.loads(line)
                item, q = ex["meta"]["item"], ex["messages"][-2]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                continue  # a line cut by a crash: that item is simply done again
            items.add(item)
            questions.add(normalize_question(q))
            n += 1
    return items, questions, n


def generate_with_helper(data_dir, out_path, url: str, model: str, count: int, index_path=None, seed: int = 0,
                         api_key: str | None = None, sources=None, timeout: float = 60.0, retries: int = 5,
                         backoff: float = 1.0, bad_reply_retries: int = 2, tokenizer=None,
                         max_tokens: int = MAX_TOKENS, progress: bool = False) -> dict:
    """Append helper-written examples to `out_path` until it holds `count`; return counts.

    Raises HelperError when the endpoint fails for good; what was written so far stays, and a
    rerun resumes after it."""
    from source.retrieval import Index

    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    done, seen, existing = _read_done(out)
    stats = Counter(existing=existing)
    if existing >= count:
        return {"requested": count, "written": 0, **stats, "path": str(out)}
    index = Index(index_path) if index_path else None
    wanted = set(sources or QA_BUILDERS)
    records = [r for s, rs in sorted(load_records(data_dir).items()) if s in wanted for r in rs]
    rng = random.Random(f"{seed}:helper")
    rng.shuffle(records)
    if out.is_file() and out.stat().st_size and not out.read_bytes().endswith(b"\n"):
        with open(out, "ab") as f:
            f.write(b"\n")  # a crash cut the last line: start the next one on its own line
    bar = tqdm(total=count, initial=existing, desc="helper", unit="ex", disable=not progress)
    try:
        with open(out, "a", encoding="utf-8") as f:
            for rec in records:
                if existing + stats["written"] >= count:
                    break
                if rec["id"] in done or is_test_entity(rec["title"]):
                    continue
                ex = _one(rec, index, url, model, api_key, timeout, retries, backoff, bad_reply_retries,
                          seen, rng, tokenizer, max_tokens, stats)
                if ex is not None:
                    f.write(json.dumps(ex, ensure_ascii=False) + "\n")
                    f.flush()
                    stats["written"] += 1
                    bar.update()
    finally:
        bar.close()
        if index is not None:
            index.close()
    return {"requested": count, **stats, "path": str(out)}


def _one(rec, index, url, model, api_key, timeout, retries, backoff, bad_reply_retries, seen, rng,
         tokenizer, max_tokens, stats) -> dict | None:
    gold = index.get(f"{rec['id']}#0") if index is not None else None
    if index is not None and gold is None:
        stats["not_indexed"] += 1
        return None
    text = clip_text(gold.text if gold else rec["text"], PASSAGE_CHARS)
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": PROMPT.format(title=rec["title"], text=text)}]
    for _ in range(bad_reply_retries + 1):
        try:
            question, answer = parse_reply(chat_completion(url, model, messages, api_key, timeout, retries,
                                                           backoff))
            break
        except BadReply:
            stats["bad_reply_attempts"] += 1
    else:
        stats["bad_replies"] += 1
        return None
    key = normalize_question(question)
    if key in seen:
        stats["duplicates"] += 1
        return None
    seen.add(key)
    if gold is not None:
        passages, pos = grounded_context(index, question, gold, rng, SHUFFLE_SHARE)
    else:
        passages, pos = [{"id": f"{rec['id']}#0", "title": rec["title"], "source": rec["source"], "text": text}], 1
    ex = {"messages": [{"role": "user", "content": question},
                       {"role": "assistant", "content": answer.replace("[1]", f"[{pos}]")}],
          "context": [],
          "meta": {"kind": "helper", "entity": rec["title"], "source": rec["source"],
                   "gold": gold.id if gold else passages[0]["id"], "item": rec["id"], "model": model}}
    if not fit_budget(ex, passages, tokenizer, max_tokens, pos, len(text)):
        stats["over_budget"] += 1
        return None
    return ex
