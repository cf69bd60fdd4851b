"""Continuous batching: many conversations through one model, one batched forward pass per step.

Design choices:
- Each request is an ordinary `generate_stream` in its own thread, talking to a `Slot`: a ChatBackend
  whose `prefill`/`decode` return once a batched step has produced that request's logits. So sampling,
  stops, retrieval and the prompt builder stay the one implementation, and the engine only decides
  what runs in each forward pass. There is no engine thread: a waiting request runs the next step
  itself, for everyone ready, when no other request is running one. A lone request so never hands
  off to another thread (on a loaded machine each wake-up costs milliseconds, per token).
- The cache is the model's `KVCache` with one batch row per slot, (layers, slots, kv_heads, max_seq,
  head_dim), preallocated once; a slot's row holds one sequence from position 0.
- A step runs every waiting decode (one token each) plus prompt chunks of at most `chunk` tokens,
  oldest request first, up to `step_tokens` prompt tokens in all: a long prompt never holds up the
  others' decoding for more than one chunk. Requests join and leave between steps; a step first
  waits up to `gather` seconds for the requests the last one served, so batches stay full.
- Exact (fp32): no row's matmul in `TorchBackend.forward_rows` has a shape that depends on the rest
  of the batch (`runtime_python/rows.py`), so a request's logits, and so its greedy reply, are bit for
  bit the same alone or in any batch (tests/test_batching.py). Chunks end on a multiple of
  `rows.PROMPT_BLOCK` where they can (`chunk_end`, as a lone prefill does), so a prompt block is
  rarely computed twice.
- Prompt cache: a freed slot keeps its K/V and the ids behind them. A new prompt takes a free slot whose
  cached prompt it would not overwrite (an empty one, or one it extends: the longest such), else the
  least recently used, so repeated and continued prompts keep finding theirs; when another slot, busy
  or free, shares a longer prefix (the system prompt, an earlier turn of the same chat), copies those
  K/V rows instead of recomputing them. Only prompt-computed positions are reused (decoded tokens ran
  through the one-row kernels; see `TorchBackend._linear`). `Slot.cached_tokens` says how many.
- Cancellation: `should_stop` is polled every step and `Slot.release()` may come from any thread;
  either frees the slot at once, and a call still waiting raises `Cancelled`.
- `Serial` gives a batch-1 backend (ONNX) the same `slot()` interface: one request at a time.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any, Callable

import torch

from runtime_python.backends import TorchBackend, common_prefix
from runtime_python.rows import chunk_end
from source.model import KVCache


class Cancelled(RuntimeError):
    """The request was stopped or its slot released while it waited for the engine."""


class Slot:
    """One request's view of the engine, satisfying the ChatBackend protocol."""

    def __init__(self, engine: "Engine", should_stop: Callable[[], bool] | None) -> None:
        b = engine.backend
        self.name, self.tokenizer, self.max_seq_len = b.name, b.tokenizer, b.max_seq_len
        self.engine, self.should_stop = engine, should_stop
        self.cached_tokens = 0  # prompt tokens of the last prefill whose K/V were reused
        self.row = -1  # the cache row it holds, once its prompt is admitted
        self.pos = 0  # tokens in that row
        self.released = False
        self.order = 0  # admission order: older prompts get their chunks first
        self.prompt: list[int] | None = None  # a prompt waiting for admission
        self.todo: list[int] = []  # prompt ids not yet run
        self.token: int | None = None  # a decode waiting for its step
        self.logits: torch.Tensor | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def prefill(self, ids: list[int]) -> torch.Tensor:
        if not ids:
            raise ValueError("prefill needs at least one token")
        if len(ids) > self.max_seq_len:
            raise ValueError(f"prompt of {len(ids)} tokens exceeds the model's window of {self.max_seq_len}")
        return self.engine._call(self, prompt=list(ids))

    def decode(self, token_id: int) -> torch.Tensor:
        if self.pos >= self.max_seq_len:
            raise ValueError(f"the model's window of {self.max_seq_len} tokens is full")
        return self.engine._call(self, token=int(token_id))

    def release(self) -> None:
        """Give the slot back (idempotent, any thread); the K/V stay behind for the prompt cache."""
        self.engine._release(self, Cancelled("the request was released"))

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class Engine:
    """`slots` concurrent requests over one TorchBackend's weights (its own batch-1 cache is unused)."""

    def __init__(self, backend: TorchBackend, slots: int = 8, chunk: int = 128, step_tokens: int = 256,
                 prompt_cache: bool = True, gather: float = 0.005) -> None:
        if slots < 1 or chunk < 1 or step_tokens < chunk:
            raise ValueError("need slots >= 1, chunk >= 1 and step_tokens >= chunk")
        self.backend, self.n_slots, self.chunk, self.step_tokens = backend, slots, chunk, step_tokens
        self.prompt_cache = prompt_cache  # off: every prompt is computed in full (for measuring the cache)
        self.gather = gather  # seconds a step waits for the requests the last one served (see _step)
        self._served: list[Slot] = []
        self.cache = KVCache(backend.cfg, slots, dtype=torch.float32, device=backend.device)
        self.tokens: list[list[int]] = [[] for _ in range(slots)]  # the ids whose K/V each row holds
        self.prompted = [0] * slots  # how many of them a prompt computed (the reusable prefix)
        self.owner: list[Slot | None] = [None] * slots
        self.last_used = [0.0] * slots
        self.live: list[Slot] = []  # handed out and not released
        self.stats = {"steps": 0, "decode_rows": 0, "prompt_tokens": 0, "cached_tokens": 0}
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._stepping = False  # a request's thread is running a step (see _call)

    # -- the request side

    @property
    def free_slots(self) -> int:
        with self._cond:
            return self.n_slots - len(self.live)

    def slot(self, should_stop: Callable[[], bool] | None = None, timeout: float | None = None) -> Slot:
        """A free slot (waits up to `timeout` seconds for one; TimeoutError after)."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.live) < self.n_slots or self._closed, timeout):
                raise TimeoutError(f"all {self.n_slots} slots stayed busy for {timeout} s")
            if self._closed:
                raise RuntimeError("the engine is closed")
            s = Slot(self, should_stop)
            self.live.append(s)
            return s

    def _call(self, s: Slot, prompt: list[int] | None = None, token: int | None = None) -> torch.Tensor:
        with self._cond:
            if s.released:
                raise RuntimeError("this slot was released")
            s.done.clear()
            s.logits, s.error = None, None
            if prompt is not None:
                self._free_row(s)  # a new prompt on the same slot is admitted afresh (and likely gets its row back)
                s.prompt = prompt
            else:
                s.token = token
            self._cond.notify_all()
            # no engine thread: a waiting request whose logits are not there yet runs the next step itself
            # when no one else is (a lone request never hands off to another thread), else waits for it
            while not s.done.is_set():
                if self._stepping:
                    self._cond.wait()
                    continue
                self._stepping = True
                try:
                    self._step()
                finally:
                    self._stepping = False
                    self._cond.notify_all()  # those served, and the next leader
        if s.error is not None:
            raise s.error
        return s.logits

    def _release(self, s: Slot, error: BaseException) -> None:
        with self._cond:
            if s.released:
                return
            s.released = True
            self.live.remove(s)
            self._free_row(s)
            s.prompt, s.todo, s.token, s.error = None, [], None, error
            s.done.set()  # a call still waiting wakes with the error
            self._cond.notify_all()

    def _free_row(self, s: Slot) -> None:
        if s.row >= 0:
            self.owner[s.row], self.last_used[s.row] = None, time.monotonic()
            s.row = -1

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for s in list(self.live):
                self._release(s, RuntimeError("the engine is closed"))
            self._cond.notify_all()

    # -- the loop

    def _admit(self, s: Slot) -> None:
        """Give `s` a cache row, reusing the longest cached prefix of its prompt."""
        ids, s.prompt = s.prompt, None
        limit = len(ids) - 1 if self.prompt_cache else 0  # the last prompt token always runs: its logits

        shared = [common_prefix(self.tokens[r][:self.prompted[r]], ids, limit) for r in range(self.n_slots)]
        free = [r for r in range(self.n_slots) if self.owner[r] is None]  # never empty: live <= slots
        # overwrite nothing cached when a free row allows it (an empty row, or one this prompt extends, such
        # as a chat's earlier turn); else the least recently used row. A row sharing only the system prompt
        # is no better than any other: that prefix is copied from wherever it is
        row = min(free, key=lambda r: (0, -shared[r]) if shared[r] == self.prompted[r] else (1, self.last_used[r]))
        keep, source = shared[row], max(range(self.n_slots), key=shared.__getitem__)
        if shared[source] > keep:  # copy a longer prefix (a system prompt, a chat's earlier turns)
            keep = shared[source]
            self.cache.k[:, row, :, :keep] = self.cache.k[:, source, :, :keep]
            self.cache.v[:, row, :, :keep] = self.cache.v[:, source, :, :keep]
            self.tokens[row] = self.tokens[source][:keep]
        else:
            del self.tokens[row][keep:]
        self.prompted[row] = keep
        self.owner[row], s.row, s.pos, s.todo = s, row, keep, ids[keep:]
        s.cached_tokens, s.order = keep, next(self._order)
        self.stats["cached_tokens"] += keep

    def _plan(self) -> tuple[list[Slot], list[tuple[int, int, int]], list[Slot], list[tuple[int, int, list[int]]]]:
        for s in list(self.live):
            if s.should_stop is not None and s.should_stop():
                self._release(s, Cancelled("the request was stopped"))
        for s in sorted((s for s in self.live if s.prompt is not None), key=lambda s: s.order):
            self._admit(s)
        dec = [s for s in self.live if s.token is not None]
        pro, chunks, budget = [], [], self.step_tokens
        for s in sorted((s for s in self.live if s.todo), key=lambda s: s.order):
            take = chunk_end(s.pos, s.pos + len(s.todo), self.chunk) - s.pos
            if take > budget:
                break
            budget -= take
            pro.append(s)
            chunks.append((s.row, s.pos, s.todo[:take]))
        return dec, [(s.row, s.pos, s.token) for s in dec], pro, chunks

    def _step(self) -> None:
        """One batched forward for every request that is ready. Called with the lock held, by the thread
        that leads this step; the lock is let go during the forward so others can queue their next call."""
        # the requests served by the last step are sampling their next token in their own threads: wait
        # a moment for them, so they share this step instead of each forcing a small step of its own
        self._cond.wait_for(lambda: self._closed or all(s.released or s.token is not None or s.prompt is not None
                                                        for s in self._served), self.gather)
        dec, decodes, pro, prompts = self._plan()
        if not decodes and not prompts:
            return
        self._cond.release()
        try:
            with torch.inference_mode():
                logits, error = self.backend.forward_rows(decodes, prompts, self.cache), None
        except Exception as e:  # delivered to the requests of this step; the engine lives on
            logits, error = None, e
        finally:
            self._cond.acquire()
        self._served = []
        self.stats["steps"] += 1
        self.stats["decode_rows"] += len(decodes)
        for i, s in enumerate(dec + pro):
            if s.released:  # released during the step: its row may already be someone else's
                continue
            if error is not None:
                s.todo, s.token, s.error = [], None, error
                s.done.set()
                continue
            if i < len(dec):
                self.tokens[s.row].append(s.token)
                s.pos, s.token = s.pos + 1, None
            else:
                ran = prompts[i - len(dec)][2]
                self.tokens[s.row].extend(ran)
                s.pos += len(ran)
                self.prompted[s.row] = s.pos
                s.todo = s.todo[len(ran):]
                self.stats["prompt_tokens"] += len(ran)
                if s.todo:
                    continue
            s.logits = logits[i]
            s.done.set()
            self._served.append(s)


class Serial:
    """`slot()` for a batch-1 backend (OnnxBackend): one request at a time, the others wait for it."""

    def __init__(self, backend: Any) -> None:
        self.backend, self.n_slots = backend, 1
        self._lock = threading.Semaphore(1)

    def slot(self, should_stop: Callable[[], bool] | None = None, timeout: float | None = None) -> "_Held":
        if not self._lock.acquire(timeout=timeout):
            raise TimeoutError(f"the model stayed busy for {timeout} s")
        return _Held(self)


class _Held:
    def __init__(self, serial: Serial) -> None:
        b = serial.backend
        self.name, self.tokenizer, self.max_seq_len = b.name, b.tokenizer, b.max_seq_len
        self.serial, self.cached_tokens, self._held = serial, 0, True

    def prefill(self, ids: list[int]) -> torch.Tensor:
        logits = self.serial.backend.prefill(ids)
        self.cached_tokens = getattr(self.serial.backend, "cached_tokens", 0)
        return logits

    def decode(self, token_id: int) -> torch.Tensor:
        return self.serial.backend.decode(token_id)

    def release(self) -> None:
        if self._held:
            self._held = False
            self.serial._lock.release()
