"""The API's request shapes and their checks: OpenAI's fields, our limits, OpenAI's error shape.

Design choices:
- Every client mistake becomes an `ApiError` (status, message, param, code) that the server
  renders as `{"error": {message, type, param, code}}`; pydantic's errors are mapped to it too.
- Unknown request fields are ignored (clients send their own extras); fields we cannot honour
  (`echo`, `suffix`, `best_of` > 1, image parts) are refused with a 400 rather than ignored.
- `max_tokens` above the server's limit (`--max-tokens-limit`, by default the model's context) is a
  400 naming the limit, as OpenAI does for its own maximum, not a silent cut; an absent one is
  min(256, limit).
- `n` > 1 (at most 8) runs n generations, without streaming; choice i samples with `seed + i`,
  so a seeded request is reproducible and its choices still differ.
- `/v1/completions` takes raw text (or token ids): `<s>` + the encoded prompt, no chat template,
  no retrieval; special-token spellings in it are the special tokens, as in a raw prompt.
"""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from runtime_python.generation import GenerationConfig

MAX_BODY_BYTES = 1 << 20
MAX_MESSAGES = 64
MAX_CHARS = 16_000  # all message contents (or a completion prompt) together
MAX_STOP = 4
MAX_N = 8
MAX_TOP_LOGPROBS = 20  # chat; legacy completions allow 5
DEFAULT_MAX_TOKENS = 256
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(e: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def validation_error(err: ValidationError | RequestValidationError) -> ApiError:
    first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    # a union field (str | list) reports its branch names ("prompt.str"): the field is what a client sent
    loc = [p for p in loc if p not in ("str", "list[str]", "list[int]", "list[ContentPart]", "int")]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    return ApiError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


# ----------------------------------------------------------------------------- request shapes

class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None


class Sampling(BaseModel):
    """The fields chat and completions share."""
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    seed: int | None = None
    n: int | None = None
    top_k: int | None = None  # extension: sampling top-k (0 = off)
    repetition_penalty: float | None = None  # extension


class ChatRequest(Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    retrieval: bool | None = None  # extension: look up sources first (default: when an index is loaded)
    retrieval_k: int | None = None  # extension: how many passages


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int]
    logprobs: int | None = None  # legacy: how many alternatives per token (0..5)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


def parse(model: type[BaseModel], body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise validation_error(e) from None


# ----------------------------------------------------------------------------- our limits

def _text(content: str | list[ContentPart] | None, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if any(p.type != "text" for p in content):
        raise ApiError(400, f"messages[{i}].content: only text parts are supported", f"messages.{i}.content")
    return "".join(p.text or "" for p in content)


def check_sampling(req: Sampling, max_tokens: int | None, param: str, limit: int) -> tuple[GenerationConfig, int]:
    """(generation config, n) from the shared fields; `limit` caps max_tokens."""
    n = 1 if req.n is None else req.n
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"n must be between 1 and {MAX_N}, got {n}", "n")
    if n > 1 and req.stream:
        raise ApiError(400, "n > 1 is supported without streaming only", "n")
    if req.temperature is not None and not 0.0 <= req.temperature <= 2.0:
        raise ApiError(400, f"temperature must be between 0 and 2, got {req.temperature}", "temperature")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise ApiError(400, f"top_p must be in (0, 1], got {req.top_p}", "top_p")
    if max_tokens is not None and not 1 <= max_tokens <= limit:
        raise ApiError(400, f"{param} must be between 1 and this server's limit ({limit}), got {max_tokens}", param)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise ApiError(400, f"stop: at most {MAX_STOP} non-empty strings", "stop")
    kw: dict[str, Any] = dict(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                              repetition_penalty=req.repetition_penalty, seed=req.seed)
    kw = {key: v for key, v in kw.items() if v is not None}
    try:
        gen = GenerationConfig(**kw, max_new_tokens=max_tokens or min(DEFAULT_MAX_TOKENS, limit),
                               stop=tuple(stop)).validate()
    except (ValueError, TypeError) as e:
        named = next((f for f in ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop")
                      if f in str(e)), None)
        raise ApiError(400, str(e), param if "max_new_tokens" in str(e) else named) from None
    return gen, n


def check_chat(req: ChatRequest, limit: int) -> tuple[list[dict], GenerationConfig, int, int, int | None]:
    """-> (messages, generation config, retrieval k, n, top logprobs or None); ApiError(400)."""
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
    use_completion = req.max_completion_tokens is not None
    gen, n = check_sampling(req, req.max_completion_tokens if use_completion else req.max_tokens,
                            "max_completion_tokens" if use_completion else "max_tokens", limit)
    k = 3 if req.retrieval_k is None else req.retrieval_k
    if not 1 <= k <= 10:
        raise ApiError(400, f"retrieval_k must be between 1 and 10, got {k}", "retrieval_k")
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", "top_logprobs")
    top = (req.top_logprobs or 0) if req.logprobs else None
    return messages, gen, k, n, top


def check_completion(req: CompletionRequest, tokenizer: Any, context: int,
                     limit: int) -> tuple[list[int], str, GenerationConfig, int, int | None]:
    """-> (prompt ids, prompt text, generation config, n, logprobs or None); ApiError(400)."""
    for name, bad in (("echo", bool(req.echo)), ("suffix", bool(req.suffix)), ("best_of", (req.best_of or 1) > 1)):
        if bad:
            raise ApiError(400, f"{name} is not supported", name, "unsupported_parameter")
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise ApiError(400, "prompt: one prompt per request (a list of exactly one string)", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ApiError(400, "prompt is empty", "prompt", "empty_prompt")
        if len(prompt) > MAX_CHARS:
            raise ApiError(400, f"prompt is too long: {len(prompt)} characters > {MAX_CHARS}", "prompt",
                           "context_length_exceeded")
        bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]  # some HF tokenizers have no BOS
        ids, text = [*bos, *tokenizer.encode(prompt)], prompt
    else:  # token ids, as they are
        if not prompt or not all(0 <= i < tokenizer.vocab_size for i in prompt):
            raise ApiError(400, f"prompt: token ids must be in [0, {tokenizer.vocab_size})", "prompt")
        ids, text = list(prompt), tokenizer.decode(prompt)
    gen, n = check_sampling(req, req.max_tokens, "max_tokens", limit)
    if len(ids) + gen.max_new_tokens > context:
        raise ApiError(400, f"the prompt ({len(ids)} tokens) + max_tokens ({gen.max_new_tokens}) exceed the "
                       f"model's context of {context} tokens", "prompt", "context_length_exceeded")
    if req.logprobs is not None and not 0 <= req.logprobs <= 5:
        raise ApiError(400, "logprobs must be between 0 and 5", "logprobs")
    return ids, text, gen, n, req.logprobs
