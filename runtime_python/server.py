"""`supermix serve`: the web chat page and an OpenAI-compatible API over one local model.

Design choices:
- Routes: `/` (the page in static/), `/static/*`, `/health`, `/v1/models`, `/v1/chat/completions`
  (OpenAI request and response shapes, SSE when `stream`), `/v1/passages/{id}` (the text behind a
  citation). Extension fields: request `retrieval` (bool), `top_k` (sampling), `retrieval_k`,
  `repetition_penalty`; responses carry `citations` on the message / the last stream chunk.
- One model, `slots` generations at once, batched into one forward pass per step
  (`runtime_python/batching.py`); `max_queue` more may wait, the next one gets 503 with
  Retry-After at once rather than hanging. Every job has a stop Event passed to the engine as
  `should_stop`; a client that disconnects (polled with `request.is_disconnected()`, or its stream
  task cancelled) sets it, so its slot frees within one step.
- Every client mistake is a 400 in OpenAI's error shape (`{"error": {message, type, param, code}}`)
  — never a 500: the chat body is read and validated here (size cap, pydantic, then our limits),
  and FastAPI's own 422s and 404s are mapped to the same shape.
- The `model` field of a request is accepted whatever it says (clients send their own defaults);
  responses name the model actually loaded.
- No BaseHTTPMiddleware: it wraps `receive` and hides disconnects from streaming endpoints.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime_python.chat import Reply, generate_stream
from runtime_python.generation import GenerationConfig

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 1 << 20
MAX_MESSAGES = 64
MAX_CHARS = 16_000  # all message contents together
MAX_STOP = 4
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_END = object()


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


def error_response(e: ApiError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status, headers=getattr(e, "headers", None))


# ----------------------------------------------------------------------------- request shape

class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Message]
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    seed: int | None = None
    n: int | None = None
    retrieval: bool | None = None  # extension: look up sources first (default: when an index is loaded)
    retrieval_k: int | None = None  # extension: how many passages
    top_k: int | None = None  # extension: sampling top-k (0 = off)
    repetition_penalty: float | None = None  # extension


def _validation_error(err: ValidationError | RequestValidationError) -> ApiError:
    first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    return ApiError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


def _text(content: str | list[ContentPart] | None, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if any(p.type != "text" for p in content):
        raise ApiError(400, f"messages[{i}].content: only text parts are supported", f"messages.{i}.content")
    return "".join(p.text or "" for p in content)


def check_request(req: ChatRequest, context: int) -> tuple[list[dict], GenerationConfig, int]:
    """Our limits on a parsed request -> (messages, generation config, retrieval k); ApiError(400)."""
    if req.n not in (None, 1):
        raise ApiError(400, "n: only one choice per request is supported", "n")
    if not req.messages:
        raise ApiError(400, "messages must not be empty", "messages", "empty_messages")
    if len(req.messages) > MAX_MESSAGES:
        raise ApiError(400, f"too many messages: {len(req.messages)} > {MAX_MESSAGES}", "messages")
    messages, chars = [], 0
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise ApiError(400, f"messages[{i}].role: unknown role {m.role!r} (system, user or assistant)",
                           f"messages.{i}.role", "invalid_role")
        text = _text(m.content, i)
        if not text.strip():
            raise ApiError(400, f"messages[{i}].content is empty", f"messages.{i}.content", "empty_message")
        chars += len(text)
        messages.append({"role": ROLES[m.role], "content": text})
    if chars > MAX_CHARS:
        raise ApiError(400, f"messages are too long: {chars} characters > {MAX_CHARS}", "messages",
                       "context_length_exceeded")
    if messages[-1]["role"] != "user":
        raise ApiError(400, "the last message must be a user message", "messages")
    if req.temperature is not None and not 0.0 <= req.temperature <= 2.0:
        raise ApiError(400, f"temperature must be between 0 and 2, got {req.temperature}", "temperature")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise ApiError(400, f"top_p must be in (0, 1], got {req.top_p}", "top_p")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if max_tokens is not None and not 1 <= max_tokens <= context:
        raise ApiError(400, f"{param} must be between 1 and the model's context ({context}), got {max_tokens}",
                       param)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise ApiError(400, f"stop: at most {MAX_STOP} non-empty strings", "stop")
    k = 3 if req.retrieval_k is None else req.retrieval_k
    if not 1 <= k <= 10:
        raise ApiError(400, f"retrieval_k must be between 1 and 10, got {k}", "retrieval_k")
    kw: dict[str, Any] = dict(temperature=req.temperature, top_p=req.top_p, max_new_tokens=max_tokens,
                              top_k=req.top_k, repetition_penalty=req.repetition_penalty, seed=req.seed)
    kw = {key: v for key, v in kw.items() if v is not None}
    try:
        gen = GenerationConfig(**kw, stop=tuple(stop)).validate()
    except (ValueError, TypeError) as e:
        named = next((f for f in ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop")
                      if f in str(e)), None)
        raise ApiError(400, str(e), "max_tokens" if "max_new_tokens" in str(e) else named) from None
    return messages, gen, k


# ----------------------------------------------------------------------------- scheduling

@dataclass
class Job:
    queue: asyncio.Queue
    stop: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False  # its client left before the engine finished


class Scheduler:
    """Up to `slots` generations at once, batched step by step by `runtime_python.batching.Engine` (a
    backend without `forward_rows`, such as ONNX, runs one at a time through `Serial`); at most
    `max_queue` more wait, the next one gets 503 with Retry-After. A generation that runs past
    `timeout` seconds stops (finish_reason "stop", the text so far); one that waited that long is a 503."""

    def __init__(self, backend: Any, index: Any, max_queue: int, slots: int = 8, timeout: float = 300.0,
                 prompt_cache: bool = True) -> None:
        from runtime_python.backends import TorchBackend
        from runtime_python.batching import Engine, Serial

        self.backend, self.index, self.max_queue, self.timeout = backend, index, max_queue, timeout
        # an exact type check: wrappers (tests' slowed-down backends) keep their own prefill/decode
        batched = type(backend) is TorchBackend
        self.engine = Engine(backend, slots, prompt_cache=prompt_cache) if batched else Serial(backend)
        self.slots = self.engine.n_slots
        # one thread per slot: the executor's queue is the waiting line, so a started job finds a free slot
        self.executor = ThreadPoolExecutor(self.slots, thread_name_prefix="supermix-generate")
        self.pending = 0  # running + waiting; touched only on the event loop
        self.running = 0  # generations holding a slot
        self._lock = threading.Lock()
        self.stats = {"completed": 0, "cancelled": 0, "rejected": 0, "timed_out": 0, "slots": self.slots}

    def submit(self, messages: list[dict], gen: GenerationConfig, retrieval: bool, k: int) -> Job:
        from runtime_python.batching import Cancelled

        if self.pending >= self.slots + self.max_queue:
            self.stats["rejected"] += 1
            e = ApiError(503, f"the model is busy ({self.slots} running, {self.max_queue} waiting); retry shortly",
                         None, "queue_full", "server_error")
            e.headers = {"Retry-After": "1"}
            raise e
        loop = asyncio.get_running_loop()
        job = Job(asyncio.Queue())
        self.pending += 1
        deadline = time.monotonic() + self.timeout

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(job.queue.put_nowait, item)
            except RuntimeError:  # the server is shutting down and its loop is closed
                job.stop.set()

        def run() -> None:
            slot = None
            try:
                if job.stop.is_set():  # its client left while it waited
                    return
                if time.monotonic() > deadline:
                    self.stats["timed_out"] += 1
                    put(ApiError(503, f"waited more than {self.timeout:g} s for the model; retry shortly", None,
                                 "timeout", "server_error"))
                    return
                # the engine drops a client that left at its next step, even in the middle of a prompt
                slot = self.engine.slot(should_stop=job.stop.is_set)
                with self._lock:
                    self.running += 1
                for item in generate_stream(slot, messages, gen, index=self.index,
                                            retrieval=retrieval and self.index is not None, k=k,
                                            should_stop=lambda: job.stop.is_set() or time.monotonic() > deadline):
                    put(item)
            except Cancelled:  # its client left: nobody reads the queue
                pass
            except Exception as e:  # delivered to the request; the worker lives on
                put(e)
            finally:
                if slot is not None:
                    slot.release()  # at once: the next request can take the slot
                    with self._lock:
                        self.running -= 1
                job.cancelled = job.stop.is_set()  # only a disconnect sets it before _END is read
                put(_END)

        def done(_: Any) -> None:
            self.pending -= 1
            self.stats["cancelled" if job.cancelled else "completed"] += 1

        loop.run_in_executor(self.executor, run).add_done_callback(done)
        return job


async def _items(job: Job, request: Request) -> AsyncIterator[str | Reply]:
    """The job's deltas and Reply; stops the job when the client goes away (or this is cancelled)."""
    try:
        last_check = time.monotonic()
        while True:
            try:
                item = job.queue.get_nowait()  # the common case while tokens flow: no timer task
            except asyncio.QueueEmpty:
                try:
                    item = await asyncio.wait_for(job.queue.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    item = None
            if time.monotonic() - last_check > 0.2 or item is None:
                last_check = time.monotonic()
                if await request.is_disconnected():
                    return
            if item is None:
                continue
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        job.stop.set()  # a no-op when the job is already over


# ----------------------------------------------------------------------------- the app

def _citations(reply: Reply | None) -> list[dict]:
    if reply is None:
        return []
    return [{"number": c.number, "id": c.id, "title": c.title, "source": c.source} for c in reply.citations]


def create_app(backend: Any, index: Any = None, max_queue: int = 16, slots: int = 8, timeout: float = 300.0,
               prompt_cache: bool = True) -> FastAPI:
    """The FastAPI app serving `backend` (`slots` generations at once, batched) with optional retrieval."""
    app = FastAPI(title="Supermix", docs_url="/docs", redoc_url=None)
    sched = Scheduler(backend, index, max_queue, slots, timeout, prompt_cache)
    app.state.scheduler = sched
    model, created = backend.name, int(time.time())
    context = int(backend.max_seq_len)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(e))

    @app.exception_handler(Exception)
    async def _bug(_: Request, e: Exception) -> JSONResponse:  # a bug of ours: still OpenAI's shape
        return error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}", None, None, "server_error"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(ApiError(e.status_code, str(e.detail), None, code))

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)  # no icon, and no 404 in the browser console

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model, "context": context, "retrieval": index is not None,
                "running": sched.running, "waiting": max(0, sched.pending - int(sched.running)),
                "max_queue": max_queue, **sched.stats}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                            "owned_by": "supermix"}]}

    @app.get("/v1/passages/{passage_id:path}")
    async def passage(passage_id: str) -> dict:
        found = index.get(passage_id) if index is not None else None
        if found is None:
            raise ApiError(404, f"no passage {passage_id!r}", "passage_id", "not_found")
        return {"object": "passage", **found.to_dict()}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise ApiError(400, f"request body is larger than {MAX_BODY_BYTES} bytes", None, "body_too_large")
        try:
            req = ChatRequest.model_validate_json(bytes(body))
        except ValidationError as e:
            raise _validation_error(e) from None
        messages, gen, k = check_request(req, context)
        retrieval = index is not None if req.retrieval is None else req.retrieval
        job = sched.submit(messages, gen, retrieval, k)
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        items = _items(job, request)
        try:  # headers wait for the first item, so a prompt the engine refuses is still a 400
            first = await anext(items)
        except StopAsyncIteration:  # the client left while it waited; nobody reads this
            return Response(status_code=499)
        except ValueError as e:  # e.g. system prompt + max_tokens larger than the window
            raise ApiError(400, str(e), "max_tokens" if "max_new_tokens" in str(e) else "messages") from None
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(_sse(first, items, job, rid, now, model, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, reply = [], None
        async for item in _chain(first, items):
            if isinstance(item, Reply):
                reply = item
            else:
                text.append(item)
        if reply is None:  # the client left; nobody reads this
            return Response(status_code=499)
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": now, "model": model,
            "choices": [{"index": 0, "finish_reason": reply.finish_reason, "logprobs": None,
                         "message": {"role": "assistant", "content": reply.text,
                                     "citations": _citations(reply)}}],
            "usage": _usage(reply), "tokens_per_second": round(reply.tokens_per_second, 2),
        })

    return app


def _usage(reply: Reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": reply.cached_tokens}}


async def _chain(first: str | Reply, rest: AsyncIterator[str | Reply]) -> AsyncIterator[str | Reply]:
    yield first
    async for item in rest:
        yield item


async def _sse(first: str | Reply, rest: AsyncIterator[str | Reply], job: Job, rid: str, created: int, model: str,
               include_usage: bool) -> AsyncIterator[str]:
    def data(obj: dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def chunk(delta: dict | None, finish: str | None = None, **extra: Any) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        return data({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": choices, **extra})

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for item in _chain(first, rest):
            if isinstance(item, Reply):
                yield chunk({}, item.finish_reason, citations=_citations(item),
                            tokens_per_second=round(item.tokens_per_second, 2))
                if include_usage:
                    yield chunk(None, usage=_usage(item))  # OpenAI's stream_options shape
            elif item:
                yield chunk({"content": item})
    except Exception as e:  # headers are sent: report in-band, the way OpenAI does
        kind = "invalid_request_error" if isinstance(e, ValueError) else "server_error"
        yield data({"error": {"message": str(e), "type": kind, "param": None, "code": None}})
    finally:  # however the stream ends (a cancelled or dropped response too), the model is freed
        job.stop.set()
    yield "data: [DONE]\n\n"


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until Ctrl-C (uvicorn, one process: the model lives in this one)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
