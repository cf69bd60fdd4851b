"""Load test for `supermix serve`: N concurrent streaming clients for T seconds, one table out.

    python benchmarks/load.py [--clients 32] [--seconds 20] [--max-tokens 32] [--model v3] [--slots 16]
    python benchmarks/load.py --url http://127.0.0.1:8000     # an already running server
    python benchmarks/load.py --sweep --model v9              # the table in docs/pages/benchmarks.md

Design choices:
- The server runs in its own process (`python -m runtime_python.cli serve` on a free 127.0.0.1
  port, `--max-queue` = clients so the test measures queueing, not rejection), so clients and
  model do not share a GIL; it is stopped at the end.
- Each client loops: one streaming /v1/chat/completions request, read to `data: [DONE]`, next.
  Clients stop starting requests after `--seconds`; requests in flight finish (bounded by
  `--timeout`). Latency is request start -> [DONE]; TTFT is request start -> first content delta.
- An error is anything but a clean 200 stream: a non-200 status (503s counted apart as rejected),
  an `error` event, a missing [DONE], or a transport exception.
- The server batches up to `--slots` requests per forward pass; more wait in its queue, and past
  `--max-queue` get 503: a client then waits the Retry-After it was given, as a polite client would.
- `--sweep` runs the documented set, each on a freshly started server: 1 and 16 clients, each
  again with `--no-prompt-cache`, then 64 clients for 60 s with a queue of 16 (errors, 503s, the server's
  RSS at start and end). The load average is printed: on a shared machine it is part of the result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

PROMPTS = ["What does json.dumps do?", "What is a closure?", "Define ephemeral.",
           "How do I read a file in Python?", "What is a hash table?", "What does 'serendipity' mean?"]


@dataclass
class Results:
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0
    rejected: int = 0
    messages: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, clients: int, max_queue: int | None = None,
                 prompt_cache: bool = True) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "runtime_python.cli", "serve", "--port", str(port), "--slots", str(args.slots),
           "--max-queue", str(max(clients, 1) if max_queue is None else max_queue)]
    if not prompt_cache:
        cmd.append("--no-prompt-cache")
    for opt in ("model", "tokenizer", "index"):
        if getattr(args, opt):
            cmd += [f"--{opt}", getattr(args, opt)]
    if args.no_retrieval:
        cmd.append("--no-retrieval")
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.terminate()
    raise SystemExit("the server did not answer /health within 120 s")


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, res: Results) -> None:
    body = {"messages": [{"role": "user", "content": prompt}], "stream": True, "max_tokens": max_tokens,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, done = None, False
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                if r.status_code == 503:
                    res.rejected += 1
                    await asyncio.sleep(float(r.headers.get("retry-after", 0)))
                else:
                    res.errors += 1
                    res.messages.append(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                ev = json.loads(data)
                if "error" in ev:
                    raise RuntimeError(ev["error"].get("message"))
                if ev.get("usage"):
                    res.tokens += ev["usage"]["completion_tokens"]
                if first is None and any(c.get("delta", {}).get("content") for c in ev.get("choices", [])):
                    first = time.perf_counter() - t0
    except Exception as e:  # every failure counts; the message is kept for the summary
        res.errors += 1
        res.messages.append(f"{type(e).__name__}: {e}")
        return
    if not done:
        res.errors += 1
        res.messages.append("stream ended without [DONE]")
        return
    res.latencies.append(time.perf_counter() - t0)
    if first is not None:
        res.ttfts.append(first)


async def run_load(url: str, clients: int, seconds: float, max_tokens: int, timeout: float) -> tuple[Results, float]:
    res = Results()
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def worker(i: int) -> None:
            n = 0
            while time.perf_counter() < stop_at:
                await one_request(client, url, PROMPTS[(i + n) % len(PROMPTS)], max_tokens, res)
                n += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        return res, time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1]


def table(res: Results, clients: int, wall: float) -> str:
    rows = [("clients", f"{clients}"), ("wall time", f"{wall:.1f} s"),
            ("requests ok", f"{len(res.latencies)}"), ("errors", f"{res.errors}"),
            ("rejected (503)", f"{res.rejected}"),
            ("latency p50", f"{pct(res.latencies, 50):.2f} s"), ("latency p95", f"{pct(res.latencies, 95):.2f} s"),
            ("TTFT p50", f"{pct(res.ttfts, 50):.2f} s"), ("TTFT p95", f"{pct(res.ttfts, 95):.2f} s"),
            ("requests/s", f"{len(res.latencies) / wall:.2f}"), ("tokens/s (all clients)", f"{res.tokens / wall:.1f}")]
    w = max(len(a) for a, _ in rows)
    lines = [f"{'metric'.ljust(w)}  {'value':>10}", "-" * (w + 12)]
    lines += [f"{a.ljust(w)}  {b:>10}" for a, b in rows]
    return "\n".join(lines)


def rss_mb(pid: int) -> float:
    """Resident memory of a process (Linux /proc), MB; nan elsewhere."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def sweep(args: argparse.Namespace) -> int:
    """The documented runs, one fresh server each; a markdown table out."""
    runs = [("1 client", 1, args.seconds, None, True), ("1 client, no prompt cache", 1, args.seconds, None, False),
            ("16 clients", 16, args.seconds, None, True),
            ("16 clients, no prompt cache", 16, args.seconds, None, False),
            ("64 clients, queue 16", 64, 60.0, 16, True)]
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    rows = ["| run | requests ok | errors | 503s | tokens/s | TTFT p50 / p95 | latency p50 / p95 | server RSS start -> end |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    failed = 0
    for name, clients, seconds, queue, cache in runs:
        proc, url = start_server(args, clients, queue, cache)
        try:
            rss0 = rss_mb(proc.pid)
            res, wall = asyncio.run(run_load(url, clients, seconds, args.max_tokens, args.timeout))
            rss1 = rss_mb(proc.pid)
        finally:
            stop(proc)
        failed += res.errors
        rows.append(f"| {name} | {len(res.latencies)} | {res.errors} | {res.rejected} | {res.tokens / wall:.1f} | "
                    f"{pct(res.ttfts, 50):.2f} / {pct(res.ttfts, 95):.2f} s | "
                    f"{pct(res.latencies, 50):.2f} / {pct(res.latencies, 95):.2f} s | {rss0:.0f} -> {rss1:.0f} MB |")
        print(rows[-1], flush=True)
        for m in sorted(set(res.messages))[:3]:
            print(f"error: {m}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\n".join(rows))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    p.add_argument("--url", help="use this running server instead of starting one")
    p.add_argument("--model", help="registry version or model.pth [default: the champion]")
    p.add_argument("--tokenizer", help="tokenizer folder for a model.pth outside the registry")
    p.add_argument("--index", help="retrieval index [default: datasets/built/index]")
    p.add_argument("--no-retrieval", action="store_true")
    p.add_argument("--slots", type=int, default=16, help="the server's --slots")
    p.add_argument("--no-prompt-cache", action="store_true", help="the server's --no-prompt-cache")
    p.add_argument("--sweep", action="store_true", help="1, 16 (with and without prompt cache) and 64 clients")
    args = p.parse_args(argv)
    if not (1 <= args.clients <= 256 and 0 < args.seconds <= 600):
        p.error("--clients must be 1..256 and --seconds 0..600")
    if args.sweep:
        return sweep(args)
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args, args.clients, prompt_cache=not args.no_prompt_cache)
    try:
        print(f"load: {args.clients} streaming clients x {args.seconds:g} s against {url} "
              f"(max_tokens {args.max_tokens})", flush=True)
        res, wall = asyncio.run(run_load(url, args.clients, args.seconds, args.max_tokens, args.timeout))
    finally:
        if proc is not None:
            stop(proc)
    print(table(res, args.clients, wall))
    for m in sorted(set(res.messages))[:5]:
        print(f"error: {m}")
    return 1 if res.errors else 0


if __name__ == "__main__":
    sys.exit(main())
