"""`supermix serve`: the web chat page and an OpenAI-compatible API over one local model.

Design choices:
- Routes: `/` (the page in static/), `/static/*`, `/docs` (a local page pointing at
  `/openapi.json`: no Swagger UI, which would load from a CDN), `/health`, `/v1/models`,
  `/v1/chat/completions`, `/v1/completions` (raw text, no template, no retrieval), both with SSE
  when `stream`, `/v1/passages/{id}` (the text behind a citation). Extension fields: request
  `retrieval`, `top_k`, `retrieval_k`, `repetition_penalty`; responses carry `citations` on the
  message / the last stream chunk. Request shapes and limits: api_models.py; Host, Origin,
  content type, API key and security headers: guard.py.
- One model, `slots` generations at once, batched into one forward pass per step
  (`runtime_python/batching.py`); `max_queue` more may wait, the next one gets 503 with
  Retry-After at once rather than hanging. Every job has a stop Event passed to the engine as
  `should_stop`; a client that disconnects (polled with `request.is_disconnected()`, or its stream
  task cancelled) sets it, so its slot frees at the next step. `--request-timeout` sets it too, at
  the deadline (504, or an in-band error once a stream has started).
- logprobs come from the engine's `on_token` hook (the raw distribution, see generation.py): the
  worker queues each token's entry just before the text it produced, so a stream chunk carries
  the logprobs of its own tokens.
- Every client mistake is a 400 in OpenAI's error shape (`{"error": {message, type, param, code}}`)
  — never a 500: the body is read and validated here (size cap, pydantic, then our limits), and
  FastAPI's own 422s and 404s are mapped to the same shape.
- The `model` field of a request is accepted whatever it says (clients send their own defaults),
  except a registry version this server did not load (404): it would silently get another model.
  Responses name the model actually loaded; `/v1/models` lists it and the registry's versions.
- No BaseHTTPMiddleware: it wraps `receive` and hides disconnects from streaming endpoints.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime_python.api_models import (MAX_BODY_BYTES, ApiError, ChatRequest, CompletionRequest, check_chat,
                                       check_completion, error_response, parse, validation_error)
from runtime_python.api_responses import (Item, chat_logprobs, chat_sse, citations, completion_sse,
                                          legacy_logprobs, stream, usage)
from runtime_python.backends import TorchBackend
from runtime_python.batching import Cancelled, Engine, Serial
from runtime_python.chat import Reply, generate_stream
from runtime_python.generation import GenerationConfig, TokenLogprob, token_logprob
from runtime_python.guard import Guard

STATIC = Path(__file__).parent / "static"
_END = object()


# ----------------------------------------------------------------------------- scheduling

@dataclass
class Job:
    queue: asyncio.Queue
    stop: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False  # its client left before the engine finished


class Scheduler:
    """Up to `slots` generations at once, batched step by step by `runtime_python.batching.Engine` (a
    backend that is not a plain TorchBackend, such as ONNX, runs one at a time through `Serial`); at
    most `max_queue` more wait, the next one gets 503 with Retry-After."""

    def __init__(self, backend: Any, index: Any, max_queue: int, slots: int = 8, prompt_cache: bool = True) -> None:
        self.backend, self.index, self.max_queue = backend, index, max_queue
        # an exact type check: wrappers (tests' slowed-down backends) keep their own prefill/decode
        batched = type(backend) is TorchBackend
        self.engine = Engine(backend, slots, prompt_cache=prompt_cache) if batched else Serial(backend)
        self.slots = self.engine.n_slots
        # one thread per slot: the executor's queue is the waiting line, so a started job finds a free slot
        self.executor = ThreadPoolExecutor(self.slots, thread_name_prefix="supermix-generate")
        self.pending = 0  # running + waiting; touched only on the event loop
        self.running = 0  # generations holding a slot
        self._lock = threading.Lock()
        self.stats = {"completed": 0, "cancelled": 0, "rejected": 0, "slots": self.slots}

    def submit(self, messages: list[dict], gen: GenerationConfig, retrieval: bool, k: int,
               logprobs: int | None = None, prompt_ids: list[int] | None = None) -> Job:
        """A job whose queue gets text deltas, then the Reply; with `logprobs` (top alternatives
        per token) each token's [TokenLogprob] comes just before its text."""
        if self.pending >= self.slots + self.max_queue:
            self.stats["rejected"] += 1
            e = ApiError(503, f"the model is busy ({self.slots} running, {self.max_queue} waiting); retry shortly",
                         None, "queue_full", "server_error")
            e.headers = {"Retry-After": "1"}
            raise e
        loop = asyncio.get_running_loop()
        job = Job(asyncio.Queue())
        self.pending += 1

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
                # the engine drops a client that left at its next step, even in the middle of a prompt
                slot = self.engine.slot(should_stop=job.stop.is_set)
                with self._lock:
                    self.running += 1
                scored: list[TokenLogprob] = []
                count = [0]  # a chat reply's first token loses its dummy-prefix space, as the text does

                def hook(i: int, logits: Any) -> None:
                    first = prompt_ids is None and count[0] == 0
                    scored.append(token_logprob(self.backend.tokenizer, logits, i, logprobs or 0, first))
                    count[0] += 1

                for item in generate_stream(slot, messages, gen, index=self.index,
                                            retrieval=retrieval and self.index is not None, k=k,
                                            should_stop=job.stop.is_set, prompt_ids=prompt_ids,
                                            on_token=None if logprobs is None else hook):
                    if scored:
                        put(scored[:])
                        scored.clear()
                    put(item)
            except Cancelled:  # its client left (or timed out): nobody reads the queue
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


async def _items(job: Job, request: Request, deadline: float | None = None) -> AsyncIterator[Item]:
    """The job's items (see submit); stops the job when the client goes away, the deadline passes
    (ApiError 504) or this is cancelled."""
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
            now = time.monotonic()
            if deadline is not None and now > deadline and item is not _END:
                raise ApiError(504, "the request ran past this server's --request-timeout", None, "request_timeout",
                               "server_error")
            if now - last_check > 0.2 or item is None:
                last_check = now
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


async def _start(job: Job, request: Request, deadline: float | None) -> AsyncIterator[Item] | None:
    """The job's items once the first is there (None: the client left), so that a prompt the
    engine refuses is still a 400 before any header is sent."""
    items = _items(job, request, deadline)
    try:
        first = await anext(items)
    except StopAsyncIteration:
        return None
    except ValueError as e:  # e.g. system prompt + max_tokens larger than the window
        raise ApiError(400, str(e), "max_tokens" if "max_new_tokens" in str(e) else "messages") from None

    async def chained() -> AsyncIterator[Item]:
        yield first
        async for item in items:
            yield item

    return chained()


async def _collect(items: AsyncIterator[Item] | None) -> tuple[Reply, list[TokenLogprob]] | None:
    """(the Reply, every token's logprobs); None when the client left (nobody reads the answer)."""
    scored: list[TokenLogprob] = []
    if items is not None:
        async for item in items:
            if isinstance(item, Reply):
                return item, scored
            if isinstance(item, list):
                scored += item
    return None


def _seeded(gen: GenerationConfig, i: int) -> GenerationConfig:
    """Choice i of n samples with seed + i: reproducible, and the choices differ."""
    return gen if i == 0 or gen.seed is None else dataclasses.replace(gen, seed=(gen.seed + i) % 2**63)


async def _read_body(request: Request) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(400, f"request body is larger than {MAX_BODY_BYTES} bytes", None, "body_too_large")
    return bytes(body)


def registry_models(models_root: Path | None) -> list[dict]:
    """The registry's versions as /v1/models entries; none when there is no readable registry."""
    if models_root is None:
        return []
    from source.registry import Registry, RegistryError

    try:
        versions = Registry(models_root).versions()
    except (RegistryError, OSError):
        return []
    out = []
    for v in versions:
        try:
            created = int(datetime.fromisoformat(v.created.replace("Z", "+00:00")).timestamp())
        except ValueError:
            created = 0
        out.append({"id": v.id, "object": "model", "created": created, "owned_by": "supermix", "kind": v.kind})
    return out


# ----------------------------------------------------------------------------- the app

def create_app(backend: Any, index: Any = None, max_queue: int = 16, *, host: str = "127.0.0.1",
               api_key: str | None = None, allow_hosts: tuple[str, ...] = (), allow_origins: tuple[str, ...] = (),
               max_tokens_limit: int | None = None, request_timeout: float | None = None,
               models_root: Path | None = None, slots: int = 8, prompt_cache: bool = True) -> FastAPI:
    """The FastAPI app serving `backend` (`slots` generations at once, batched) with optional retrieval.
    `host` is the address it is bound to (for the Host check); see guard.py for the rest."""
    app = FastAPI(title="Supermix", docs_url=None, redoc_url=None)
    app.add_middleware(Guard, bound_host=host, allow_hosts=tuple(allow_hosts), allow_origins=tuple(allow_origins),
                       api_key=api_key or None)
    sched = Scheduler(backend, index, max_queue, slots, prompt_cache)
    app.state.scheduler = sched
    model, created = backend.name, int(time.time())
    context = int(backend.max_seq_len)
    limit = min(context, max_tokens_limit or context)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return error_response(e, getattr(e, "headers", None))  # a full queue's Retry-After

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(ApiError(e.status_code, str(e.detail), None, code))

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        return FileResponse(STATIC / "api.html", headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)  # no icon, and no 404 in the browser console

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model, "context": context, "retrieval": index is not None,
                "auth": bool(api_key), "max_tokens_limit": limit,
                "running": sched.running, "waiting": max(0, sched.pending - int(sched.running)),
                "max_queue": max_queue, **sched.stats}

    @app.get("/v1/models")
    async def models() -> dict:
        listed = registry_models(models_root)
        served = next((m for m in listed if m["id"] == model),  # a registry version: its own date and kind
                      {"id": model, "object": "model", "created": created, "owned_by": "supermix"})
        others = [{**m, "loaded": False} for m in listed if m["id"] != model]
        return {"object": "list", "data": [{**served, "loaded": True}, *others]}

    @app.get("/v1/passages/{passage_id:path}")
    async def passage(passage_id: str) -> dict:
        found = index.get(passage_id) if index is not None else None
        if found is None:
            raise ApiError(404, f"no passage {passage_id!r}", "passage_id", "not_found")
        return {"object": "passage", **found.to_dict()}

    def check_model(name: str | None) -> None:
        if name and name != model and any(m["id"] == name for m in registry_models(models_root)):
            raise ApiError(404, f"model {name!r} is in the registry but this server runs {model!r}; start "
                           f"`supermix serve --model {name}` to use it", "model", "model_not_found")

    def submit_all(n: int, submit: Any) -> list[Job]:
        jobs: list[Job] = []
        try:
            for i in range(n):
                jobs.append(submit(i))
        except ApiError:  # the queue filled up part way: no half answers
            for job in jobs:
                job.stop.set()
            raise
        return jobs

    def deadline() -> float | None:
        return time.monotonic() + request_timeout if request_timeout else None

    async def run_jobs(jobs: list[Job], request: Request) -> list[tuple[Reply, list[TokenLogprob]]] | None:
        end = deadline()  # the whole request, however many choices
        try:
            results = [await _collect(await _start(job, request, end)) for job in jobs]
        finally:
            for job in jobs:
                job.stop.set()
        return None if any(r is None for r in results) else results  # type: ignore[return-value]

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse(ChatRequest, await _read_body(request))
        check_model(req.model)
        messages, gen, k, n, top = check_chat(req, limit)
        retrieval = index is not None if req.retrieval is None else req.retrieval
        jobs = submit_all(n, lambda i: sched.submit(messages, _seeded(gen, i), retrieval, k, logprobs=top))
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            items = await _start(jobs[0], request, deadline())
            if items is None:  # the client left while it waited; nobody reads this
                return Response(status_code=499)
            with_usage = bool((req.stream_options or {}).get("include_usage"))
            return stream(chat_sse(items, jobs[0].stop, rid, now, model, with_usage))
        results = await run_jobs(jobs, request)
        if results is None:
            return Response(status_code=499)
        choices = [{"index": i, "finish_reason": reply.finish_reason,
                    "logprobs": chat_logprobs(scored) if top is not None else None,
                    "message": {"role": "assistant", "content": reply.text, "refusal": None,
                                "citations": citations(reply)}} for i, (reply, scored) in enumerate(results)]
        return JSONResponse({"id": rid, "object": "chat.completion", "created": now, "model": model,
                             "choices": choices, "usage": usage([r for r, _ in results]),
                             "tokens_per_second": round(results[0][0].tokens_per_second, 2)})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse(CompletionRequest, await _read_body(request))
        check_model(req.model)
        ids, text, gen, n, top = check_completion(req, backend.tokenizer, context, limit)
        jobs = submit_all(n, lambda i: sched.submit([], _seeded(gen, i), False, 0, logprobs=top, prompt_ids=ids))
        rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            items = await _start(jobs[0], request, deadline())
            if items is None:
                return Response(status_code=499)
            with_usage = bool((req.stream_options or {}).get("include_usage"))
            return stream(completion_sse(items, jobs[0].stop, rid, now, model, with_usage, top, len(text)))
        results = await run_jobs(jobs, request)
        if results is None:
            return Response(status_code=499)
        choices = [{"index": i, "text": reply.text, "finish_reason": reply.finish_reason,
                    "logprobs": legacy_logprobs(scored, len(text)) if top is not None else None}
                   for i, (reply, scored) in enumerate(results)]
        return JSONResponse({"id": rid, "object": "text_completion", "created": now, "model": model,
                             "choices": choices, "usage": usage([r for r, _ in results])})

    return app


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until Ctrl-C (uvicorn, one process: the model lives in this one)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
