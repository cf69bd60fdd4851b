// The JavaScript port of source/prompt.py, the one prompt builder (its docstring lists the design):
// the prompt laid out and budgeted exactly like source/prompt.py (split_messages, build_prompt,
// _keep_end, cited_numbers), with source/sft_data.py (to_chat_messages, clip_text, prepare_context)
// and source/tokenizer.py (format_context, defuse_special_tokens). The ids come from the
// exported tokenizer_config.json chat template, which renders the layout of Tokenizer.encode_chat;
// for a model fine-tuned from an imported base it is the model's own template, and `chatTokenizer`
// prepares the messages as source/hf_tokenizer.py's HFTokenizer.chat_messages does (site.json's `chat`).
// tests/test_prompt.py runs this file in node over the same cases as Python and requires identical
// prompt ids, laid-out messages, shown passages and cited numbers.
// Python counts string lengths in code points, so the clipping below does too (Array.from).

const PY_SPACE = "[\\t\\n\\v\\f\\r\\x1c-\\x20\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]";
const LEAD = new RegExp(`^${PY_SPACE}+`), TRAIL = new RegExp(`${PY_SPACE}+$`);
const rstrip = (s) => s.replace(TRAIL, "");
export const strip = (s) => rstrip(s).replace(LEAD, "");  // Python str.strip(), not String.trim()
const cpLen = (s) => Array.from(s).length;
const CITATION = / ?\[[0-9]+\]/g;
const CITE = /\[([0-9]{1,9}(?:[ \t\n\r\f\v]*,[ \t\n\r\f\v]*[0-9]{1,9})*)\]/g;  // ASCII: \d, \s differ from Python's

/** source.sft_data.clip_text: cut at a word boundary to at most maxChars, " ..." marking the cut. */
export function clipText(text, maxChars) {
  text = strip(text);
  const cps = Array.from(text);
  if (cps.length <= maxChars) return text;
  let cut = -1;  // text.rfind(" ", 0, maxChars - 3)
  for (let i = Math.min(maxChars - 4, cps.length - 1); i >= 0; i--) if (cps[i] === " ") { cut = i; break; }
  cut = cut > Math.floor(maxChars / 2) ? cut : maxChars - 4;
  return rstrip(cps.slice(0, cut).join("")) + " ...";
}

/** source.sft_data.prepare_context: retrieval passages -> the context list, texts clipped. */
export function prepareContext(passages, maxChars) {
  return passages.map((p) => ({ id: p.id ?? "", title: p.title ?? "", source: p.source ?? "",
                                text: clipText(p.text ?? "", maxChars) }));
}

// source.tokenizer.defuse_special_tokens: text spelling a special token would be encoded as it
// (a forged turn); its "<" becomes U+2039, longest token first, exactly as in Python.
const SPECIAL = /<\|assistant\|>|<\|context\|>|<\|system\|>|<\|user\|>|<\|end\|>|<unk>|<\/s>|<s>/g;
export const defuseSpecialTokens = (text) => text.replace(SPECIAL, (t) => "\u2039" + t.slice(1));

/** source.tokenizer.format_context: "[1] title\ntext\n\n[2] ...", titles and texts defused (a document
 * spelling "<|end|><|system|>" must not forge turns). */
export function formatContext(passages) {
  return passages.map((p, i) => {
    const title = defuseSpecialTokens(strip(p.title || "")), text = defuseSpecialTokens(strip(p.text || ""));
    return title ? `[${i + 1}] ${title}\n${text}` : `[${i + 1}] ${text}`;
  }).join("\n\n");
}

/** source.sft_data.to_chat_messages for a conversation that starts with its system message. */
export function toChatMessages(messages, context) {
  const msgs = messages.map((m) => ({ role: m.role, content: m.content }));
  const last = msgs.map((m) => m.role).lastIndexOf("user");
  for (const m of msgs.slice(0, last)) {  // earlier replies cite passages that are no longer shown
    if (m.role === "assistant") m.content = m.content.replace(CITATION, "");
  }
  if (context && context.length) msgs.splice(last, 0, { role: "context", content: formatContext(context) });
  return msgs;
}

/** source.prompt.split_messages: [system text, earlier turns, latest user text], all defused. */
export function splitMessages(messages, systemPrompt) {
  const system = [], turns = [];
  messages.forEach((m, i) => {
    if (typeof m?.content !== "string") throw new Error(`messages[${i}]: must be an object with a string content`);
    if (m.role === "system") system.push(defuseSpecialTokens(m.content));
    else if (m.role === "user" || m.role === "assistant") turns.push({ role: m.role, content: defuseSpecialTokens(m.content) });
    else throw new Error(`messages[${i}].role: ${m.role} is not one of system, user, assistant`);
  });
  if (!turns.length || turns.at(-1).role !== "user") throw new Error("the conversation must end with a user message");
  return [system.length ? system.join("\n\n") : systemPrompt, turns.slice(0, -1), turns.at(-1).content];
}

/** source.prompt.retrieval_query: the latest user message, then the user message before it. */
export function retrievalQuery(messages, systemPrompt = "") {
  const [, history, question] = splitMessages(messages, systemPrompt);
  const earlier = history.filter((t) => t.role === "user").map((t) => t.content);
  return earlier.length ? `${question}\n${earlier.at(-1)}` : question;
}

/** source.prompt.cited_numbers: "[2] and [1, 3]" -> [1, 2, 3]. */
export function citedNumbers(text) {
  const out = new Set();
  for (const m of text.matchAll(CITE)) for (const n of m[1].split(",")) out.add(parseInt(n.trim(), 10));
  return [...out].sort((a, b) => a - b);
}

/** HFTokenizer.defuse: each spelling of `tokens` (longest first, as site.json lists them) broken by a
 * look-alike "<" (U+2039), or a word joiner (U+2060) after its first character. */
export function defuser(tokens) {
  if (!tokens.length) return (text) => text;
  const re = new RegExp(tokens.map((t) => t.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&")).join("|"), "g");
  return (text) => text.replace(re, (t) => {
    const [first, ...rest] = Array.from(t);  // code points, as Python indexes
    return first === "<" ? "\u2039" + rest.join("") : first + "\u2060" + rest.join("");
  });
}

/** HFTokenizer.chat_messages: contents defused; "context" folded into the next user message. */
function modelMessages(msgs, defuse, foldContext) {
  const out = [];
  let sources = [];
  msgs.forEach((m, i) => {
    let content = defuse(m.content);
    if (m.role === "context" && foldContext) { sources.push(content); return; }
    if (sources.length) {
      if (m.role !== "user") throw new Error(`message ${i}: a context message must come right before a user message`);
      content = "Sources:\n" + sources.join("\n\n") + "\n\n" + content;
      sources = [];
    }
    out.push({ role: m.role, content });
  });
  if (sources.length) throw new Error("a context message must come right before a user message, not last");
  return out;
}

/** The `tok` buildPrompt needs, over a transformers.js tokenizer of an exported folder. `chat`: site.json's
 * `chat` for a model with its own chat template ({defuse, fold_context}); absent for ours. */
export function chatTokenizer(tokenizer, chat = null) {
  const prepare = chat ? ((d) => (msgs) => modelMessages(msgs, d, chat.fold_context))(defuser(chat.defuse))
    : (msgs) => msgs;
  return {
    encode: (text) => tokenizer.encode(text, { add_special_tokens: false }),  // ids, no BOS
    encodeChat: (msgs) => Array.from(tokenizer.apply_chat_template(prepare(msgs), {
      add_generation_prompt: true, tokenize: true, return_tensor: false, return_dict: false })),
  };
}

const FIT_ROUNDS = 3;  // source.prompt.FIT_ROUNDS

/**
 * source.prompt.build_prompt: {ids, messages, passages, question} within the token budget.
 * `tok`: {encode(text) -> ids without BOS, encodeChat(messages) -> ids with the generation prompt}
 * (chatTokenizer). `minPassageChars` is source.prompt.MIN_PASSAGE_CHARS (site.json carries it).
 * A model's own template costs more than the per-message count: then the next budget is that
 * layout's count less the excess and the layout is redone, as in Python (ours always fits at once).
 */
export function buildPrompt(tok, messages, passages, systemPrompt, maxNewTokens, maxSeqLen, minPassageChars) {
  const [system, history, question] = splitMessages(messages, systemPrompt);
  const limit = maxSeqLen - maxNewTokens;
  let budget = limit, ids = [];
  for (let round = 0; round < FIT_ROUNDS; round++) {
    const fitted = fit(tok, system, history, question, passages, budget, maxNewTokens, maxSeqLen, minPassageChars);
    ids = fitted.ids;
    if (ids.length <= limit) return { ids, messages: fitted.messages, passages: fitted.passages, question };
    budget = Math.min(budget, fitted.total) - (ids.length - limit);
  }
  throw new Error(`prompt of ${ids.length} tokens exceeds the budget of ${limit}`);
}

/** source.prompt._fit: the layout that takes at most `limit` tokens by the per-message count (`total`). */
function fit(tok, system, history, user, passages, limit, maxNewTokens, maxSeqLen, minPassageChars) {
  const cost = (content) => tok.encode(content).length + 2;  // <|role|> content <|end|>
  const fixed = 2 + cost(system) + cost("");
  if (fixed + 1 > limit) {
    throw new Error(`cannot fit a prompt: the system prompt takes ${fixed - 6} tokens and max_new_tokens is ` +
                    `${maxNewTokens}, but the model's window is ${maxSeqLen} tokens; lower max_new_tokens`);
  }
  const laidOut = toChatMessages([{ role: "system", content: system }, ...history, { role: "user", content: user }]);
  const costs = laidOut.slice(1, -1).map((m) => cost(m.content));
  const userCost = cost(user) - 2;
  let ctx = passages.map((p) => ({ ...p }));
  const ctxCost = () => (ctx.length ? cost(formatContext(ctx)) : 0);
  let start = 0, total = fixed + costs.reduce((a, c) => a + c, 0) + ctxCost() + userCost;
  while (total > limit && start < history.length) {  // 1. the oldest exchange goes first
    total -= costs[start++];
    while (start < history.length && history[start].role === "assistant") total -= costs[start++];
  }
  while (total > limit && ctx.length) {  // 2. shrink the passages, then drop the last-ranked
    const before = ctxCost();
    const longest = Math.max(...ctx.map((p) => cpLen(p.text)));
    if (longest > minPassageChars) {
      const cap = Math.max(minPassageChars, Math.floor(longest * 0.7));
      ctx = ctx.map((p) => ({ ...p, text: clipText(p.text, cap) }));
    } else {
      ctx.pop();
    }
    total += ctxCost() - before;
  }
  if (total > limit) user = keepEnd(tok, user, limit - (total - userCost));  // 3. the end of the question
  const kept = toChatMessages([{ role: "system", content: system }, ...history.slice(start),
                               { role: "user", content: user }], ctx);
  return { ids: tok.encodeChat(kept), messages: kept, passages: ctx, total };
}

/** source.prompt._keep_end: the longest suffix that encodes to at most `room` tokens. */
function keepEnd(tok, text, room) {
  const cps = Array.from(text);
  let lo = 0, hi = cps.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (tok.encode(cps.slice(mid).join("")).length <= room) hi = mid; else lo = mid + 1;
  }
  return cps.slice(lo).join("");
}
