"""`supermix chat` and `supermix ask`: the terminal front end over `runtime_python.chat`.

Design choices:
- The conversation lives in one `ChatSession` (history, system prompt, retrieval switch, last
  citations), the same class the web server's logic is built from; this file only reads lines,
  runs /commands and prints deltas as they arrive.
- Ctrl-C during a reply must stop the reply, not the program: while a reply streams, SIGINT only
  sets a flag that the generator polls through `should_stop` (and the print loop checks, so a
  reply stops even between tokens). At the prompt, Ctrl-C and Ctrl-D leave with exit status 0.
- `readline` is imported only when stdin is a TTY: arrow-key history for people, plain `input()`
  for pipes (readline would echo escape codes into captured output).
- `/set FIELD VALUE` accepts any GenerationConfig field, coerced to the field's type and checked
  by `GenerationConfig.validate()`; a bad value prints one error line and keeps the old config.
- Per-reply stats (model, tokens, tokens/s) are dim, on their own line, so they never mix with
  the answer when a user copies it.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import signal
import sys
import threading
from typing import Any, Callable, Iterator

import click

from runtime_python.chat import ChatSession, Reply, generate_stream
from runtime_python.generation import GenerationConfig

PROMPT = "you> "
HELP = """commands:
  /reset                 start a new conversation (keeps the system prompt)
  /system TEXT           set the system prompt for the next replies
  /retrieval on|off      look up sources before answering, or not
  /sources               the sources cited by the last reply
  /set FIELD VALUE       change generation, e.g. /set temperature 0  (/set alone lists them)
  /help                  this list
  /quit                  leave (Ctrl-D and Ctrl-C at the prompt too)
Ctrl-C while a reply streams stops that reply."""


# ----------------------------------------------------------------------------- helpers

def _dim(text: str) -> str:
    return click.style(text, dim=True)


def _stats_line(model: str, reply: Reply) -> str:
    stopped = "" if reply.finish_reason == "stop" else f", {reply.finish_reason}"
    return f"[{model} · {reply.completion_tokens} tokens · {reply.tokens_per_second:.1f} tok/s{stopped}]"


def set_field(gen: GenerationConfig, field: str, raw: str) -> GenerationConfig:
    """A new validated config with `field` set from the text `raw`; ValueError on any problem."""
    fields = {f.name: f for f in dataclasses.fields(gen)}
    aliases = {"max_tokens": "max_new_tokens"}
    field = aliases.get(field, field)
    if field not in fields:
        raise ValueError(f"unknown setting {field!r}; one of: {', '.join(fields)}")
    current = getattr(gen, field)
    raw = raw.strip()
    value: Any
    if field == "stop":  # a JSON list, or one plain stop string; empty clears it
        if not raw or raw in ("none", "[]"):
            value = ()
        elif raw.startswith("["):
            try:
                value = tuple(str(s) for s in json.loads(raw))
            except json.JSONDecodeError as e:
                raise ValueError(f"stop: not a JSON list ({e})") from None
        else:
            value = (raw,)
    elif field == "seed" and raw.lower() in ("none", "off", ""):
        value = None
    else:
        kind = type(current) if current is not None else int
        if kind is bool:
            value = raw.lower() in ("1", "true", "yes", "on")
        else:
            try:
                value = kind(raw)
            except ValueError:
                raise ValueError(f"{field} must be {'an integer' if kind is int else 'a number'}, "
                                 f"got {raw!r}") from None
    return dataclasses.replace(gen, **{field: value}).validate()


def format_sources(citations: list, shown: list | None = None) -> str:
    """The cited sources; when the reply cited none, the ones it was shown (said so)."""
    def lines(cs: list) -> str:
        return "\n".join(f"[{c.number}] {c.title} — {c.source} ({c.id})" for c in cs)

    if citations:
        return lines(citations)
    if shown:
        return f"the reply cited none of the {len(shown)} sources it was shown:\n{lines(shown)}"
    return "no sources for the last reply"


class _Interrupt:
    """While active, Ctrl-C sets `self.hit` instead of raising KeyboardInterrupt."""

    def __init__(self) -> None:
        self.hit = threading.Event()
        self._old: Any = None

    def __enter__(self) -> "_Interrupt":
        self.hit.clear()
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, lambda *_: self.hit.set())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


def _stream_kwargs(fn: Callable, should_stop: Callable[[], bool]) -> dict:
    """Pass `should_stop` where the engine accepts it; otherwise the print loop alone stops the reply."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    ok = "should_stop" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    return {"should_stop": should_stop} if ok else {}


def _print_stream(items: Iterator[str | Reply], stop: threading.Event, engine_polls: bool) -> Reply | None:
    """Echo deltas as they come; the final Reply, or None when the user stopped it first.

    When the engine polls `should_stop` it ends with its own Reply (partial text, real counts), so
    the loop keeps reading until then; otherwise the loop itself breaks off and closes the stream.
    """
    reply = None
    try:
        for item in items:
            if isinstance(item, Reply):
                reply = item
            elif not stop.is_set():
                click.echo(item, nl=False)
                sys.stdout.flush()
            if stop.is_set() and not engine_polls:
                break
    finally:
        close = getattr(items, "close", None)
        if close:
            close()
    click.echo()
    return reply


# ----------------------------------------------------------------------------- chat

def _command(line: str, session: ChatSession, gen: GenerationConfig, has_index: bool) -> GenerationConfig | None:
    """Run one /command; returns the (possibly new) config, or None to quit."""
    name, _, arg = line[1:].partition(" ")
    arg = arg.strip()
    if name in ("quit", "exit", "q"):
        return None
    if name == "help":
        click.echo(HELP)
    elif name == "reset":
        session.reset()
        click.echo(_dim("(new conversation)"))
    elif name == "system":
        if not arg:
            click.echo(click.style("error: /system needs the new system prompt", fg="red"))
        else:
            session.set_system(arg)
            click.echo(_dim("(system prompt set; /reset to start over with it)"))
    elif name == "retrieval":
        if arg not in ("on", "off"):
            click.echo(f"retrieval is {'on' if session.retrieval else 'off'}; use /retrieval on|off")
        elif arg == "on" and not has_index:
            click.echo(click.style("error: no retrieval index loaded (see --index)", fg="red"))
        else:
            session.retrieval = arg == "on"
            click.echo(_dim(f"(retrieval {arg})"))
    elif name == "sources":
        last = getattr(session, "last_reply", None)
        click.echo(format_sources(session.last_citations, getattr(last, "sources", None)))
    elif name == "set":
        field, _, value = arg.partition(" ")
        if not field:
            click.echo("\n".join(f"  {f.name} = {getattr(gen, f.name)!r}" for f in dataclasses.fields(gen)))
        else:
            try:
                gen = set_field(gen, field, value)
                click.echo(_dim(f"({field} = {value.strip() or '()'})"))
            except ValueError as e:
                click.echo(click.style(f"error: {e}", fg="red"))
    else:
        click.echo(click.style(f"error: unknown command /{name}; try /help", fg="red"))
    return gen


def run_chat(backend: Any, index: Any, gen: GenerationConfig, retrieval: bool | None = None) -> None:
    """The interactive loop; returns when the user leaves."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (side effect: arrow keys and history for input())
        except ImportError:
            pass
    session = ChatSession(backend, index=index, retrieval=index is not None if retrieval is None else retrieval)
    model = backend.name
    click.echo(_dim(f"supermix chat · {model} · retrieval {'on' if session.retrieval else 'off'} · "
                    "/help for commands, /quit to leave"))
    interrupt = _Interrupt()
    while True:
        try:
            line = input(PROMPT)
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            new = _command(line, session, gen, index is not None)
            if new is None:
                return
            gen = new
            continue
        with interrupt:
            try:
                kw = _stream_kwargs(session.stream, interrupt.hit.is_set)
                reply = _print_stream(session.stream(line, gen, **kw), interrupt.hit, bool(kw))
            except ValueError as e:  # e.g. a prompt the model cannot fit
                click.echo(click.style(f"error: {e}", fg="red"))
                continue
        if interrupt.hit.is_set():
            click.echo(_dim("(stopped)"))
        if reply is not None:
            click.echo(_dim(_stats_line(model, reply)))


# ----------------------------------------------------------------------------- ask

def ask_once(backend: Any, index: Any, gen: GenerationConfig, question: str, as_json: bool = False) -> None:
    """One answer: streamed text (+ sources) for people, or one JSON object for scripts."""
    messages = [{"role": "user", "content": question}]
    reply: Reply | None = None
    parts: list[str] = []
    try:
        for item in generate_stream(backend, messages, gen, index=index, retrieval=index is not None):
            if isinstance(item, Reply):
                reply = item
            elif as_json:
                parts.append(item)
            else:
                click.echo(item, nl=False)
                sys.stdout.flush()
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    assert reply is not None, "generate_stream ended without a Reply"
    if as_json:
        click.echo(json.dumps({
            "answer": reply.text,
            "citations": [{"id": c.id, "title": c.title, "source": c.source} for c in reply.citations],
            "model": backend.name,
            "tokens_per_second": round(reply.tokens_per_second, 2),
        }, ensure_ascii=False))
        return
    click.echo()
    if reply.citations:
        click.echo("\n" + format_sources(reply.citations))
    click.echo(_dim(_stats_line(backend.name, reply)), err=True)
