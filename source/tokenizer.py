"""Tokenizer stage: SentencePiece BPE training, the chat template, and the tokenizer.json export.

Design choices:
- SentencePiece **BPE**, not Unigram (docs/pages/decisions.md): transformers.js ignores Unigram's byte fallback, so
  newlines and non-ASCII text broke in the browser. BPE with `byte_fallback` never emits <unk>.
- Lossless text: identity normalization, no whitespace squeezing, whitespace-only pieces allowed
  (indentation), digits split one per token (arithmetic, version numbers), dummy prefix "▁".
- Fixed ids: <unk>=0 <s>=1 </s>=2, then the chat tokens <|system|> <|user|> <|assistant|>
  <|context|> <|end|> = 3..7 (user-defined symbols, never split), no pad (the model masks instead).
- Training text is split at blank lines (newlines kept, so pieces such as "):\n" can be learned),
  capped at 2,048 characters per sentence, and sampled down to `max_chars` by a seeded streaming
  bottom-k sample, so memory and time are bounded however large the corpus is.
- tokenizer.json is built by hand with `tokenizers` (Llama-2 layout); transformers' converters are
  broken or missing for SentencePiece BPE (docs/pages/decisions.md). Parity with sentencepiece is tested.
- Special-token strings inside text are matched as tokens, and the text between them gets its own
  dummy prefix. That is what `tokenizers` does (it splits on added tokens, then normalizes each
  segment, so Prepend("▁") applies per segment), and it is exactly why the HF chat template, which
  renders to one string, gives the same ids as `encode_chat`, which encodes each message alone.
  `Tokenizer.encode` copies that rule, so our ids equal tokenizer.json's everywhere. (Raw
  `sp.encode` differs there: one dummy prefix for the whole string, and "<s>" spelled out.)
- The vocabulary is exactly `vocab_size` (hard limit): the model's embedding is sized from it, so a
  corpus too small (or too varied) for it raises a ValueError instead of silently shrinking.
- Known limit: a literal "▁" (U+2581) in text decodes as a space, in sentencepiece and tokenizer.json
  alike (it is sentencepiece's whitespace symbol).
"""

from __future__ import annotations

import hashlib
import heapq
import io
import itertools
import json
import os
import random
import re
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import sentencepiece as spm

from source.files import atomic_write_bytes

CONTROL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
CHAT_ROLES = ["system", "user", "assistant", "context"]
CHAT_TOKENS = [f"<|{r}|>" for r in CHAT_ROLES] + ["<|end|>"]  # ids 3..7, in this order
SPECIAL_TOKENS = CONTROL_TOKENS + CHAT_TOKENS
# leftmost-longest, like the added-token matcher of `tokenizers` (and Tokenizer.encode below)
_SPECIAL_SPELLING = re.compile("|".join(map(re.escape, sorted(SPECIAL_TOKENS, key=len, reverse=True))))

MAX_SENTENCE_CHARS = 2048  # sentencepiece silently drops longer sentences (limit given in bytes)

# One Jinja line, no whitespace between tags: renders the same layout as `encode_chat`. Tested under
# transformers (jinja2); uses only what @huggingface/jinja (transformers.js) also supports.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'context'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


# -----------------------------------------------------------------------------
# training

def _split_sentences(text: str) -> Iterator[str]:
    """Blank-line paragraphs with their newlines, cut at line ends to at most MAX_SENTENCE_CHARS."""
    for para in re.split(r"(?<=\n\n)", text):
        chunk = ""
        for line in para.splitlines(keepends=True):
            if len(chunk) + len(line) > MAX_SENTENCE_CHARS and chunk:
                yield chunk
                chunk = ""
            while len(line) > MAX_SENTENCE_CHARS:  # one huge line (minified code, tables)
                yield line[:MAX_SENTENCE_CHARS]
                line = line[MAX_SENTENCE_CHARS:]
            chunk += line
        if chunk.strip():
            yield chunk


def sample_sentences(texts: Iterable[str], max_chars: int | None, seed: int = 0) -> list[str]:
    """A seeded uniform sample of sentences totalling at most `max_chars` (all of them if None).

    Bottom-k sampling: each sentence draws a random key, we keep the smallest keys that fit in the
    budget. One pass, memory bounded by `max_chars`, and unlike "the first N chars" it does not
    favour whichever source the corpus lists first.
    """
    rng = random.Random(seed)
    heap: list[tuple[float, int, str]] = []  # max-heap on key via negation; int = input order
    total = 0
    order = itertools.count()
    for text in texts:
        for s in _split_sentences(text):
            key = rng.random()
            if max_chars is not None and total + len(s) > max_chars and heap and -heap[0][0] < key:
                continue  # would be evicted at once
            heapq.heappush(heap, (-key, next(order), s))
            total += len(s)
            while max_chars is not None and total > max_chars and heap:
                total -= len(heapq.heappop(heap)[2])
    return [s for _, _, s in sorted(heap, key=lambda item: item[1])]


def _json_bytes(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _friendly_error(err: RuntimeError, vocab_size: int, n_chars: int) -> ValueError:
    """Turn sentencepiece's vocabulary-size RuntimeErrors into a ValueError a user can act on."""
    msg = str(err)
    if m := re.search(r"value <= (\d+)", msg):
        return ValueError(f"vocab_size={vocab_size} is too large for this corpus ({n_chars:,} characters "
                          f"of training text): at most {m.group(1)} pieces can be learned. Lower the "
                          f"vocab size or train on more text.")
    if m := re.search(r"smaller than required_chars\. \d+ vs (\d+)", msg):
        return ValueError(f"vocab_size={vocab_size} is too small for this corpus: it needs at least "
                          f"{m.group(1)} (8 special + 256 byte + one piece per distinct character).")
    return ValueError(f"sentencepiece training failed: {msg}")


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 8192,
                    max_chars: int | None = None, seed: int = 0, character_coverage: float = 1.0,
                    model_max_length: int = 1024) -> Path:
    """Train a SentencePiece BPE tokenizer on `texts` and write the HF-compatible folder `out_dir`.

    The vocabulary is exactly `vocab_size` (the model's embedding depends on it): a corpus too
    small for it raises ValueError rather than silently giving fewer pieces.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sentences = sample_sentences(texts, max_chars, seed)
    n_chars = sum(map(len, sentences))
    if not sentences:
        raise ValueError("no training text: every text was empty or whitespace")

    spm.set_random_generator_seed(seed)  # sentencepiece's own shuffling/sampling
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, model_type="bpe",
            vocab_size=vocab_size, character_coverage=character_coverage,
            byte_fallback=True, split_digits=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=CHAT_TOKENS,
            # sampling already bounded the input; these keep sentencepiece from dropping any of it
            input_sentence_size=len(sentences), shuffle_input_sentence=True,
            max_sentence_length=4 * MAX_SENTENCE_CHARS,  # bytes: 4 per char in the worst case
            num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as err:
        raise _friendly_error(err, vocab_size, n_chars) from err

    files = export_files(model.getvalue(), model_max_length)
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
    return out


# -----------------------------------------------------------------------------
# export: tokenizer.json + tokenizer_config.json + special_tokens_map.json

def bpe_merges(sp: spm.SentencePieceProcessor) -> list[tuple[str, str]]:
    """Merge rules for `tokenizers` from sentencepiece pieces: every split of a learned piece into two
    pieces, ranked by the merged piece's score (sentencepiece BPE applies the highest score first).

    Only normal pieces take part: control, byte and chat pieces are never merge results.
    Equivalent to transformers' `generate_merges` (not public API in transformers 4.57).
    """
    normal = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))
              and sp.id_to_piece(i) not in CHAT_TOKENS}
    merges = []
    for piece, score in normal.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in normal and right in normal:
                merges.append((-score, i, left, right))
    merges.sort()
    return [(left, right) for _, _, left, right in merges]


def build_tokenizer_json(model_bytes: bytes) -> str:
    """The Llama-2-style `tokenizers` BPE equivalent of a sentencepiece BPE model, as JSON."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    # read through the processor API: the protobuf package is not a dependency
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    tk = HFTokenizer(BPE(vocab, bpe_merges(sp), unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # Prepend+Replace, not Metaspace(prepend_scheme="first"): Metaspace skips the dummy prefix when
    # the text already starts with a space, sentencepiece does not. No pre-tokenizer: sentencepiece
    # does not split on whitespace at encode time either.
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # Fuse before Strip, so Strip removes the dummy prefix of the whole text, not of every token.
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(content=" ", left=1, right=0)])
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", vocab["<s>"])])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tk.to_str(pretty=True)


def export_files(model_bytes: bytes, model_max_length: int = 1024) -> dict[str, bytes]:
    """All files of a tokenizer folder, name -> bytes, from the sentencepiece model."""
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    ids = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    want = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    if any(ids.get(t) != i for t, i in want.items()):
        raise RuntimeError(f"special token ids moved: {[(t, ids.get(t)) for t in SPECIAL_TOKENS]}")

    special_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "additional_special_tokens": CHAT_TOKENS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "add_bos_token": True,  # the post-processor adds <s>; the chat template writes it itself
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False,
                                          "rstrip": False, "single_word": False, "special": True}
                                 for t, i in want.items()},
        "chat_template": CHAT_TEMPLATE,
    }
    return {
        "tokenizer.model": model_bytes,
        "tokenizer.json": build_tokenizer_json(model_bytes).encode("utf-8"),
        "tokenizer_config.json": _json_bytes(config),
        "special_tokens_map.json": _json_bytes(special_map),
    }


# -----------------------------------------------------------------------------
# runtime wrapper

def defuse_special_tokens(text: str) -> str:
    """Text with every special-token spelling's "<" replaced by "\u2039" (a look-alike), longest token
    first: it stays readable and encodes as text, not as the token."""
    return _SPECIAL_SPELLING.sub(lambda m: "\u2039" + m.group()[1:], text)


def format_context(passages: list[dict]) -> str:
    """Retrieval passages as numbered sources for a `context` message: "[1] title\\ntext\\n\\n[2] ...".

    Titles and texts are defused: a document that spells "<|end|><|system|>" must not forge turns. This is
    the one place passages become prompt text, for training (sft_data) and serving (source.prompt) alike."""
    blocks = []
    for i, p in enumerate(passages, 1):
        title = defuse_special_tokens((p.get("title") or "").strip())
        text = defuse_special_tokens((p.get("text") or "").strip())
        blocks.append(f"[{i}] {title}\n{text}" if title else f"[{i}] {text}")
    return "\n\n".join(blocks)


class ChatTokenizer(Protocol):
    """What the runtime and the prompt builder use of a tokenizer: `Tokenizer` (ours, sentencepiece) and
    `source.hf_tokenizer.HFTokenizer` (any tokenizer.json with its model's chat template) both provide it."""

    path: Path
    sha256: str  # identifies the vocabulary (caches key on it)
    vocab_size: int  # ids are 0..vocab_size-1
    bos_id: int | None  # None: the tokenizer has no BOS token
    eos_id: int
    special_ids: dict[str, int]  # besides eos/bos, the tokens that end a reply (chat-role and control tokens)
    dummy_prefix: bool  # decode drops the leading space of the first piece (sentencepiece's "▁" prefix)
    fffd_per_byte: bool  # decode writes invalid UTF-8 as one U+FFFD per byte, not one per invalid sequence

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def id_to_piece(self, i: int) -> str: ...

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True
                    ) -> tuple[list[int], list[int]]: ...

    def token_bytes(self) -> tuple[list[bytes], frozenset[int]]: ...


class Tokenizer:
    """A trained tokenizer folder, encoded with sentencepiece (fast, C++, threaded batches)."""

    dummy_prefix = fffd_per_byte = True

    def __init__(self, path: Path, model_bytes: bytes) -> None:
        self.path = path
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.vocab_size: int = self.sp.get_piece_size()
        self.unk_id, self.bos_id, self.eos_id = (self.sp.piece_to_id(t) for t in CONTROL_TOKENS)
        self.special_ids: dict[str, int] = {t[2:-2]: self.sp.piece_to_id(t) for t in CHAT_TOKENS}
        self._all_special = {self.sp.piece_to_id(t): t for t in SPECIAL_TOKENS}
        self._by_text = {t: i for i, t in self._all_special.items()}
        self._special_re = _SPECIAL_SPELLING

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        path = Path(path)
        model = path / "tokenizer.model"
        if not model.is_file():
            raise FileNotFoundError(f"{model} not found: train one with `builder tokenizer train`")
        return cls(path, model.read_bytes())

    def encode(self, text: str) -> list[int]:
        """Token ids, no BOS. Special-token strings become their ids; each piece of text between
        them gets its own dummy prefix (the tokenizer.json rule, see the module docstring)."""
        if "<" not in text:  # fast path: no special token can occur
            return self.sp.encode(text)
        ids: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                ids += self.sp.encode(text[pos:m.start()])
            ids.append(self._by_text[m.group()])
            pos = m.end()
        if pos < len(text):
            ids += self.sp.encode(text[pos:])
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not any("<" in t for t in texts):
            return self.sp.encode(list(texts))  # one call, threaded in C++
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, skipping special tokens (like HF `skip_special_tokens=True`)."""
        return self.sp.decode([i for i in ids if i not in self._all_special])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def token_bytes(self) -> tuple[list[bytes], frozenset[int]]:
        """What each id adds to the decoded text, as UTF-8 bytes ("▁" -> space, <0xE2> -> that byte, special
        tokens -> nothing, like `decode`), and the set of byte-fallback ids."""
        sp, table, byte_ids = self.sp, [], set()
        for i in range(self.vocab_size):
            piece = sp.id_to_piece(i)
            if i in self._all_special or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                table.append(b"")
            elif sp.is_byte(i):  # "<0xE2>"
                table.append(bytes([int(piece[3:-1], 16)]))
                byte_ids.add(i)
            else:
                table.append(piece.replace("\u2581", " ").encode("utf-8"))
        return table, frozenset(byte_ids)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> tuple[list[int], list[int]]:
        """Chat ids and the SFT loss mask: 1 on assistant content and its closing <|end|>.

        Layout: <s> then per message <|role|> content <|end|>, then <|assistant|> if asked. Each
        content is encoded alone, so it starts with the dummy prefix, exactly like the Jinja template
        in tokenizer_config.json after `tokenizers` splits the rendered string on special tokens.
        """
        ids, mask = [self.bos_id], [0]
        end = self.special_ids["end"]
        for i, msg in enumerate(messages):
            role, content = msg.get("role"), msg.get("content")
            if role not in self.special_ids or role == "end":
                raise ValueError(f"message {i}: unknown role {role!r} (expected one of {', '.join(CHAT_ROLES)})")
            if not isinstance(content, str):
                raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
            body = self.encode(content) + [end]
            train = 1 if role == "assistant" else 0
            ids += [self.special_ids[role]] + body
            mask += [0] + [train] * len(body)
        if add_generation_prompt:
            ids.append(self.special_ids["assistant"])
            mask.append(0)
        return ids, mask
