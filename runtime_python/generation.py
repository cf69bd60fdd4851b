"""Generation: sampling settings, the sampler, and the text stream (UTF-8 safe, stop sequences).

Design choices:
- `GenerationConfig` is a plain dataclass; `validate()` checks every field once per request and
  names the field and its allowed range in the ValueError, so the CLI and the HTTP API can show the
  message as is. temperature 0 means greedy (argmax); top_k 0 and top_p 1 switch those filters off.
- `sample_next` applies, in Hugging Face's order: repetition penalty -> temperature -> top-k ->
  top-p -> one draw. Greedy skips everything but the penalty. Top-p looks at the top-k survivors when
  top_k is set, else at the fewest best tokens that hold its prefix (never a sort of the whole
  vocabulary), and is skipped entirely when top_p is 1.
- The repetition penalty (CTRL rule, as in HF: positive logits divided, negative multiplied) sees
  the tokens of the reply so far, not the prompt: the model's job is to copy from its numbered
  sources, and penalising prompt tokens would push it away from the words it should quote.
- Seeds: a `torch.Generator` per request (`make_generator`), so the same seed, prompt and settings
  give the same text whatever else the process samples. seed=None draws from torch's global RNG.
- `IncrementalDetokenizer`: each vocabulary id maps once (per tokenizer, cached) to its bytes
  (`token_bytes()` of the tokenizer: "▁" -> space, byte-fallback pieces <0xE2> -> that byte, special
  tokens -> nothing; byte-level BPE pieces -> their bytes). The bytes go
  through Python's incremental UTF-8 decoder, which holds back an incomplete character until its
  last byte arrives, so no half character is ever emitted. O(1) per token instead of re-decoding
  the whole reply, and the concatenation equals `Tokenizer.decode` (the dummy-prefix space of the
  first piece is dropped, as sentencepiece does).
- `StopChecker` works on that text: it holds back the longest tail that could still grow into a
  stop sequence, and cuts before the earliest stop found, so a stop spanning several tokens is
  never shown, not even in part, and nothing after it either.
- `token_logprob` scores a sampled token against the model's raw distribution (log-softmax of the
  logits the backend returned), before repetition penalty, temperature and top-k/top-p: the same
  numbers whatever the sampling settings, as OpenAI's API reports them. `generate_stream` hands
  each sampled token and those logits to an optional `on_token` hook; the server calls this there.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Sequence

import torch

from source.tokenizer import ChatTokenizer

MAX_TEMPERATURE = 5.0
MAX_REPETITION_PENALTY = 10.0
MAX_STOP_SEQUENCES = 16


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0  # 0: no top-k filter
    repetition_penalty: float = 1.0  # 1: off
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def validate(self) -> "GenerationConfig":
        """Check every field (ValueError naming the field and its range); returns self for chaining.
        A single stop string or a list is normalised to a tuple."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be between 0 and {MAX_TEMPERATURE:g} (0 = greedy), "
                             f"got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_number(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}] (1 = off), "
                             f"got {self.repetition_penalty!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if len(stop) > MAX_STOP_SEQUENCES:
            raise ValueError(f"stop: at most {MAX_STOP_SEQUENCES} sequences, got {len(stop)}")
        self.stop = tuple(stop)
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63) or None, got {self.seed!r}")
        return self


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator | None:
    """A private RNG for one request (None: torch's global RNG)."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def apply_repetition_penalty(logits: torch.Tensor, generated: list[int], penalty: float) -> torch.Tensor:
    """A penalised copy of `logits` (vocab,): seen tokens' logits divided (>0) or multiplied (<0)."""
    if penalty == 1.0 or not generated:
        return logits
    idx = torch.tensor(sorted(set(generated)), dtype=torch.long, device=logits.device)
    seen = logits.index_select(0, idx)
    out = logits.clone()  # the caller's logits stay as they were
    out.index_copy_(0, idx, torch.where(seen > 0, seen / penalty, seen * penalty))
    return out


def sample_next(logits: torch.Tensor, cfg: GenerationConfig, generated: list[int],
                generator: torch.Generator | None = None) -> int:
    """The next token id from last-position `logits` (vocab,). `generated`: the reply's ids so far."""
    logits = apply_repetition_penalty(logits.float(), generated, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return int(logits.argmax())
    vocab = logits.numel()
    if 0 < cfg.top_k < vocab:
        vals, idx = torch.topk(logits, cfg.top_k)  # sorted, best first
        probs = torch.softmax(vals / cfg.temperature, dim=-1)
    elif cfg.top_p < 1.0:
        probs, idx = _top_p_candidates(torch.softmax(logits / cfg.temperature, dim=-1), cfg.top_p)
    else:  # no filter: sample the full distribution, no sort needed
        probs = torch.softmax(logits / cfg.temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator))
    if cfg.top_p < 1.0:
        # keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p
        before = probs.cumsum(0) - probs
        n = max(1, int((before < cfg.top_p).sum()))
        probs, idx = probs[:n], idx[:n]
    return int(idx[torch.multinomial(probs, 1, generator=generator)])


def _top_p_candidates(probs: torch.Tensor, top_p: float, first: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The most likely tokens, best first, enough of them to hold the top-p prefix: the `first` best, more
    while their mass is short of top_p, the whole vocabulary at worst. The same prefix as sorting the
    whole vocabulary, without the sort (most of a sampled token's cost when many requests share a core)."""
    k = min(first, probs.numel())
    while True:
        vals, idx = torch.topk(probs, k)
        if k == probs.numel() or float(vals.cumsum(0)[-1]) >= top_p:  # the cumsum top-p then cuts
            return vals, idx
        k = min(k * 8, probs.numel())


@dataclass
class TokenLogprob:
    """One sampled token scored by the raw distribution, with the `top` most likely alternatives."""
    id: int
    text: str  # the vocabulary piece ("▁" as a space); a lone byte of a character reads as U+FFFD
    bytes: bytes
    logprob: float
    top: list["TokenLogprob"]


def token_logprob(tokenizer: ChatTokenizer, logits: torch.Tensor, token_id: int, top: int = 0,
                  first: bool = False) -> TokenLogprob:
    """`token_id`'s log-probability under softmax(`logits`) and the `top` best tokens (best first).
    `first`: the reply's first token, whose dummy-prefix space the text drops (IncrementalDetokenizer),
    so its string and bytes drop it too and the tokens join up to the reply text."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    table, byte_ids = token_bytes(tokenizer)

    def entry(i: int, lp: float, alts: list[TokenLogprob]) -> TokenLogprob:
        raw = table[i] or tokenizer.id_to_piece(i).encode("utf-8")  # special tokens by name: "<|end|>"
        return TokenLogprob(i, raw.decode("utf-8", errors="replace"), raw, lp, alts)

    alts = []
    if top > 0:
        vals, idx = torch.topk(logp, min(top, logp.numel()))
        alts = [entry(int(i), float(v), []) for v, i in zip(vals, idx)]
    chosen = entry(token_id, float(logp[token_id]), alts)
    if first and tokenizer.dummy_prefix and chosen.bytes[:1] == b" " and token_id not in byte_ids:
        chosen.bytes, chosen.text = chosen.bytes[1:], chosen.text[1:]
    return chosen


# ----------------------------------------------------------------------------- text streaming

_BYTE_TABLES: dict[str, tuple[list[bytes], frozenset[int]]] = {}  # tokenizer sha256 -> (bytes per id, byte ids)

# sentencepiece writes one U+FFFD per invalid byte; Python's "replace" one per maximal invalid run
codecs.register_error("supermix-per-byte", lambda e: ("\ufffd" * (e.end - e.start), e.end))


def token_bytes(tokenizer: ChatTokenizer) -> tuple[list[bytes], frozenset[int]]:
    """What each id contributes to the decoded text, as UTF-8 bytes, and the set of byte-fallback
    ids (`tokenizer.token_bytes()`, built once per tokenizer)."""
    cached = _BYTE_TABLES.get(tokenizer.sha256)
    if cached is None:
        cached = _BYTE_TABLES[tokenizer.sha256] = tokenizer.token_bytes()
    return cached


class IncrementalDetokenizer:
    """Token ids in, text out, only ever whole characters: `push(id)` -> new text ("" while a
    multi-byte character is incomplete), `flush()` -> what is left (U+FFFD for a broken tail).
    `continuation=True` keeps a first piece's leading space: the text continues a raw prompt
    ("The capital is" + "▁Paris"), so that space is real, not sentencepiece's dummy prefix. A tokenizer
    without a dummy prefix (byte-level BPE) keeps every space."""

    def __init__(self, tokenizer: ChatTokenizer, continuation: bool = False) -> None:
        self._bytes, self._byte_ids = token_bytes(tokenizer)
        # sentencepiece and byte fallback write one U+FFFD per invalid byte; byte-level BPE's decoder (Rust's
        # from_utf8_lossy) one per invalid sequence, as Python's "replace" does
        errors = "supermix-per-byte" if tokenizer.fffd_per_byte else "replace"
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=errors)
        self._started = continuation or not tokenizer.dummy_prefix  # the first byte may be the dummy prefix

    def push(self, token_id: int) -> str:
        data = self._bytes[token_id]
        if not self._started and data:
            self._started = True
            # sentencepiece drops the dummy prefix of a first normal piece ("▁The"), not a byte <0x20>
            if data[:1] == b" " and token_id not in self._byte_ids:
                data = data[1:]
        return self._utf8.decode(data) if data else ""

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class StopChecker:
    """Text in, safe text out: `push(text)` returns what can be shown now; text that might be the
    start of a stop sequence waits. Once a stop is found `stopped` is True, the text before it has
    been returned and everything from it on is dropped. `flush()` releases held text at the end."""

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self.stop = tuple(s for s in stop if s)
        self.stopped = False
        self._held = ""

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stop:
            return text
        held = self._held + text
        # earliest stop wins; it can only start inside `held` (nothing that could begin one was emitted)
        cut = min((i for i in (held.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._held = True, ""
            return held[:cut]
        keep = 0  # the longest tail of `held` that is a proper prefix of some stop sequence
        for s in self.stop:
            for n in range(min(len(s) - 1, len(held)), keep, -1):
                if held.endswith(s[:n]):
                    keep = n
                    break
        self._held = held[len(held) - keep:] if keep else ""
        return held[:len(held) - keep]

    def flush(self) -> str:
        out, self._held = ("" if self.stopped else self._held), ""
        return out

