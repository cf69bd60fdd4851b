"""HFTokenizer: a Hugging Face model's own `tokenizer.json` and chat template behind the interface of our
`Tokenizer` (`source.tokenizer.ChatTokenizer`), so the prompt builder, the chat engine and the API drive a
pretrained model's tokenizer unchanged.

Design choices:
- Encoding is the `tokenizers` library on tokenizer.json: special-token spellings in text are matched as
  tokens and no post-processor runs (`add_special_tokens=False`), which is what transformers'
  `apply_chat_template` does with the rendered chat. So `encode` gives no BOS, like ours.
- The chat template is rendered with jinja2 in the environment transformers builds (sandboxed, trim_blocks,
  lstrip_blocks, loopcontrols, its `tojson`, `raise_exception` and `strftime_now`, a pass-through
  `{% generation %}` block) with the same variables (messages, tools, documents, add_generation_prompt and
  the special-token strings of tokenizer_config.json): the same string, so the same ids (tested against
  `AutoTokenizer.apply_chat_template`). The template is chat_template.jinja when the folder has one, else
  tokenizer_config.json's `chat_template` (a list of named templates: "default"), transformers' priority.
- Defusing: every message content is defused before rendering. A special token's spelling (and a bracketed
  added token's, such as <tool_call>) gets its "<" replaced by U+2039, as `defuse_special_tokens` does for
  ours, or a word joiner (U+2060) after its first character if it does not start with "<". Only the
  template writes control tokens; no user text or retrieved document can forge a turn.
- "context" messages (the retrieved sources of our training layout) are a role other models' templates do
  not know: they are folded into the next user message as "Sources:\\n...\\n\\n" + the question. Our own
  template (a `builder export` folder) has the role, and keeps it: there the ids equal `Tokenizer.encode_chat`'s.
- The loss mask (for fine-tuning) marks the tokens that overlap an assistant message's content in the
  rendered text, through the first special token after it (the turn's end). An assistant message the
  template rewrites (some templates drop earlier turns' reasoning), or an empty one, has no place in the
  text to be found at and stays unmasked.
- Streaming needs the bytes of every id: byte-level BPE pieces through GPT-2's byte alphabet;
  SentencePiece-style pieces "▁" -> space and <0xNN> -> that byte. The table is checked against `decode`
  on a probe text at load, which also tells whether decode drops the first piece's leading space (the
  dummy prefix). A decoder the table cannot reproduce is refused by name. Invalid UTF-8 reads as one
  U+FFFD per byte with byte fallback, one per invalid sequence with byte-level BPE, as `decode` writes it.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Iterable

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from source.tokenizer import CHAT_TEMPLATE

# the special-token attributes transformers passes to a chat template (PreTrainedTokenizerBase)
TOKEN_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
                    "additional_special_tokens")
CHAT_ROLES = ("system", "user", "assistant", "context")
SP_DECODERS = {"Metaspace", "Replace", "ByteFallback", "Fuse", "Strip"}
# ASCII, accents, an em dash, runs of spaces, a tab, a newline, digits and an emoji
PROBE = "Hello wörld, 1234 — naïve café\n  indented\ttab 😀 end."
_BRACKETED = re.compile(r"<[^<>\s]+>|\[[^\[\]\s]+\]")
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class TokenizerError(ValueError):
    """A tokenizer folder problem; the message names the file and the field."""


class _Generation(Extension):
    """transformers' `{% generation %}...{% endgeneration %}` marks assistant text for its own mask; here the
    block just renders its body (the mask comes from where the messages' contents are)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' filter: unlike jinja's own, it does not HTML-escape
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_template(source: str, where: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise TokenizerError(f"{where}: the chat template does not parse (line {exc.lineno}: {exc.message})") from None


def byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: the printable character each byte is written as -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = dict(zip(printable, printable)), 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = 256 + extra, extra + 1
    return {chr(c): b for b, c in chars.items()}


def read_json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path}: cannot read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value, where: str) -> str:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken object {"content": ...}."""
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    if not isinstance(value, str):
        raise TokenizerError(f"{where} must be a string or {{\"content\": ...}}, got {value!r:.60}")
    return value


def template_variables(config: dict, legacy: dict, where: str) -> dict:
    """The special-token strings transformers hands a chat template: tokenizer_config.json's, then
    special_tokens_map.json's for a field the config lacks (older folders), then extra_special_tokens."""
    out: dict = {}
    extra = config.get("extra_special_tokens") or {}
    if not isinstance(extra, dict):
        raise TokenizerError(f"{where}: extra_special_tokens must be an object")
    for key in (*TOKEN_ATTRIBUTES, *extra):
        value = extra[key] if key in extra else config[key] if key in config else legacy.get(key)
        if not value:  # transformers leaves unset or empty tokens out
            continue
        if key == "additional_special_tokens":
            if not isinstance(value, list):
                raise TokenizerError(f"{where}: additional_special_tokens must be a list")
            out[key] = [_token_text(v, f"{where}: additional_special_tokens") for v in value]
        else:
            out[key] = _token_text(value, f"{where}: {key}")
    return out


def read_chat_template(folder: Path, config: dict) -> tuple[str | None, str]:
    """(template or None, where it came from): chat_template.jinja, else tokenizer_config.json's field."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
    where = f"{folder / 'tokenizer_config.json'}: chat_template"
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise TokenizerError(f"{where}: a list of templates needs one named 'default', got "
                                 f"{sorted(map(str, named))}")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{where} must be a string, got {type(template).__name__}")
    return template, where


class HFTokenizer:
    """A Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json [+ chat_template.jinja])."""

    def __init__(self, path: Path, tokenizer_json: bytes, config: dict, legacy: dict) -> None:
        from tokenizers import Tokenizer as FastTokenizer

        self.path = path
        where = str(path / "tokenizer_config.json")
        self.sha256 = hashlib.sha256(tokenizer_json).hexdigest()
        try:
            spec = json.loads(tokenizer_json)
            self.tk = FastTokenizer.from_str(tokenizer_json.decode("utf-8"))
        except Exception as exc:  # json's ValueError, or the bare Exception tokenizers raises on a bad file
            raise TokenizerError(f"{path / 'tokenizer.json'}: not a tokenizers file ({exc})") from None
        self.vocab_size = max(self.tk.get_vocab(with_added_tokens=True).values()) + 1
        added = self.tk.get_added_tokens_decoder()
        self._added = {i: t.content for i, t in added.items()}
        self.special_ids = {t.content: i for i, t in sorted(added.items()) if t.special}
        self.template_vars = template_variables(config, legacy, where)
        if "eos_token" not in self.template_vars:
            raise TokenizerError(f"{where}: no eos_token (the token that ends a reply)")
        self.eos_id = self._id(self.template_vars["eos_token"], f"{where}: eos_token")
        bos = self.template_vars.get("bos_token")
        self.bos_id = self._id(bos, f"{where}: bos_token") if bos else None
        defused = [t.content for t in added.values() if t.special or _BRACKETED.fullmatch(t.content)]
        self.defused_tokens = sorted(defused, key=len, reverse=True)  # longest first (the site's port takes the list)
        self._defuse_re = re.compile("|".join(map(re.escape, self.defused_tokens))) if defused else None
        self.chat_template, self.template_source = read_chat_template(path, config)
        self._template = (compile_template(self.chat_template, self.template_source)
                          if self.chat_template is not None else None)
        self.native_context = self.chat_template == CHAT_TEMPLATE  # ours lays out "context" turns itself
        self._table, self._byte_ids, self.dummy_prefix = self._byte_table(spec)
        self.byte_level = self._byte_level  # GPT-2 byte-level pieces (else SentencePiece-style ones)
        self.fffd_per_byte = not self._byte_level

    @classmethod
    def load(cls, folder: str | Path) -> "HFTokenizer":
        folder = Path(folder)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if not (folder / name).is_file():
                raise TokenizerError(f"{folder / name} not found: a Hugging Face tokenizer folder needs tokenizer.json "
                                     "(the fast tokenizer) and tokenizer_config.json (its special tokens and chat "
                                     "template)")
        legacy = folder / "special_tokens_map.json"
        return cls(folder, (folder / "tokenizer.json").read_bytes(), read_json_object(folder / "tokenizer_config.json"),
                   read_json_object(legacy) if legacy.is_file() else {})

    def _id(self, token: str, where: str) -> int:
        i = self.tk.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{where} is {token!r}, which is not in {self.path / 'tokenizer.json'}")
        return i

    # -- text

    def encode(self, text: str) -> list[int]:
        """Token ids, no BOS; special-token spellings become their ids (as in tokenizers and transformers)."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, skipping special tokens (like HF `skip_special_tokens=True`)."""
        return self.tk.decode(list(ids), skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self.tk.id_to_token(i) or ""

    def defuse(self, text: str) -> str:
        """`text` with no spelling of a special (or bracketed added) token left: each one is broken by a look-alike
        "<" or a word joiner, so it stays readable and encodes as text."""
        if self._defuse_re is None:
            return text
        return self._defuse_re.sub(lambda m: "\u2039" + m.group()[1:] if m.group()[0] == "<"
                                   else m.group()[0] + "\u2060" + m.group()[1:], text)

    # -- chat

    def chat_messages(self, messages: list[dict]) -> list[dict]:
        """Messages as the template gets them: roles checked, contents defused, context folded into the next user
        message."""
        out: list[dict] = []
        sources: list[str] = []
        for i, msg in enumerate(messages):
            role, content = msg.get("role"), msg.get("content")
            if role not in CHAT_ROLES:
                raise ValueError(f"message {i}: unknown role {role!r} (expected one of {', '.join(CHAT_ROLES)})")
            if not isinstance(content, str):
                raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
            content = self.defuse(content)
            if role == "context" and not self.native_context:
                sources.append(content)
                continue
            if sources:
                if role != "user":
                    raise ValueError(f"message {i}: a context message must come right before a user message")
                content, sources = "Sources:\n" + "\n\n".join(sources) + "\n\n" + content, []
            out.append({"role": role, "content": content})
        if sources:
            raise ValueError("a context message must come right before a user message, not last")
        return out

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template applied to already prepared messages (`chat_messages`), as transformers renders it."""
        if self._template is None:
            raise TokenizerError(f"{self.path / 'tokenizer_config.json'}: no chat_template (and no "
                                 "chat_template.jinja): this tokenizer cannot lay out a chat")
        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.template_vars)
        except jinja2.exceptions.TemplateError as exc:
            raise ValueError(f"{self.template_source}: the chat template failed: {exc}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> tuple[list[int], list[int]]:
        """Chat ids (the model's template, defused contents) and the loss mask: 1 on assistant content
        through its turn's end token."""
        msgs = self.chat_messages(messages)
        text = self.render(msgs, add_generation_prompt)
        enc = self.tk.encode(text, add_special_tokens=False)
        return enc.ids, self._mask(text, enc.ids, enc.offsets, msgs)

    def _mask(self, text: str, ids: list[int], offsets: list[tuple[int, int]], msgs: list[dict]) -> list[int]:
        spans, cursor = [], 0
        for m in msgs:  # contents in order; the cursor keeps a reply from matching inside an earlier message
            for content in dict.fromkeys((m["content"], m["content"].strip())):
                at = text.find(content, cursor) if content else -1
                if at >= 0:
                    cursor = at + len(content)
                    if m["role"] == "assistant":
                        spans.append((at, cursor))
                    break
        mask, special = [0] * len(ids), set(self.special_ids.values()) | {self.eos_id}
        for start, end in spans:
            inside = [k for k, (a, b) in enumerate(offsets) if a < end and b > start and ids[k] not in special]
            if not inside:
                continue
            last = inside[-1]
            stop = next((k for k in range(last + 1, len(ids)) if ids[k] in special), last)
            for k in range(inside[0], stop + 1):
                mask[k] = 1
        return mask

    # -- streaming

    def token_bytes(self) -> tuple[list[bytes], frozenset[int]]:
        return self._table, self._byte_ids

    def _byte_table(self, spec: dict) -> tuple[list[bytes], frozenset[int], bool]:
        """(bytes per id, byte-fallback ids, dummy prefix), checked against `decode` on PROBE."""
        decoder = spec.get("decoder") or {}
        kinds = {d.get("type") for d in decoder.get("decoders", [decoder]) if isinstance(d, dict)}
        byte_level = self._byte_level = "ByteLevel" in kinds
        if not byte_level and not (kinds and kinds <= SP_DECODERS):
            raise TokenizerError(f"{self.path / 'tokenizer.json'}: decoder {sorted(map(str, kinds))} is not supported "
                                 "(byte-level BPE or SentencePiece-style pieces are)")
        alphabet, fallback = byte_alphabet(), bool((spec.get("model") or {}).get("byte_fallback"))
        table, byte_ids, special = [], set(), set(self.special_ids.values())
        for i in range(self.vocab_size):
            piece = self.tk.id_to_token(i)
            if piece is None or i in special:
                table.append(b"")
            elif i in self._added:  # a non-special added token decodes as its own text
                table.append(piece.encode("utf-8"))
            elif byte_level:
                table.append(bytes(alphabet[c] for c in piece) if all(c in alphabet for c in piece)
                             else piece.encode("utf-8"))
            elif fallback and _BYTE_PIECE.fullmatch(piece):
                table.append(bytes([int(piece[3:5], 16)]))
                byte_ids.add(i)
            else:
                table.append(piece.replace("\u2581", " ").encode("utf-8"))
        ids = self.encode(PROBE)
        spelled, decoded = b"".join(table[i] for i in ids).decode("utf-8", errors="replace"), self.decode(ids)
        if spelled != decoded and spelled != " " + decoded:
            raise TokenizerError(f"{self.path / 'tokenizer.json'}: its decoder turns {PROBE!r} into {decoded!r}, but "
                                 f"its pieces spell {spelled!r}: this decoder is not supported")
        return table, frozenset(byte_ids), spelled != decoded


# the files of a Hugging Face tokenizer folder a model version keeps (besides a licence file)
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def has_tokenizer(folder: str | Path) -> bool:
    """Whether `folder` holds our tokenizer (tokenizer.model) or a Hugging Face one (tokenizer.json)."""
    return (Path(folder) / "tokenizer.model").is_file() or (Path(folder) / "tokenizer.json").is_file()


def load_tokenizer(folder: str | Path):
    """Our SentencePiece `Tokenizer` where the folder has tokenizer.model, else an `HFTokenizer` (a version
    fine-tuned from an imported base keeps the base's tokenizer.json and chat template)."""
    from source.tokenizer import Tokenizer

    return Tokenizer.load(folder) if (Path(folder) / "tokenizer.model").is_file() else HFTokenizer.load(folder)
