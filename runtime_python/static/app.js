// Supermix chat page: talks to this server's OpenAI-compatible /v1/chat/completions with
// stream=true, parses the SSE stream from fetch() by hand (EventSource cannot POST), and
// aborts the request for Stop (the server notices the disconnect and frees the model).
// No dependencies, no external requests; text is always inserted with textContent.
// With `supermix serve --api-key`, /v1 needs "Authorization: Bearer KEY": the key typed under
// Settings stays in this tab's sessionStorage (gone when the tab closes) and goes with each call.
"use strict";

const $ = (id) => document.getElementById(id);
const turns = [];          // [{role, content}] sent with every request (the server is stateless)
let controller = null;        // AbortController of the reply in flight

function addMessage(role, text) {
  const box = document.createElement("article");
  box.className = `msg ${role}`;
  const who = document.createElement("h2");
  who.className = "sr-only";
  who.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("div");
  body.className = "body";
  body.textContent = text;
  box.append(who, body);
  $("log").append(box);
  box.scrollIntoView({block: "end"});
  return box;
}

function authHeaders() {
  const key = sessionStorage.getItem("supermix-api-key");
  return key ? {"Authorization": `Bearer ${key}`} : {};
}

function askForKey(message) {
  $("settings").open = true;
  $("api-key").focus();
  $("status").textContent = message;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  if (!busy) $("prompt").focus();
}

async function togglePassage(link, item) {
  const open = link.getAttribute("aria-expanded") === "true";
  let panel = item.querySelector(".passage");
  if (open) {
    link.setAttribute("aria-expanded", "false");
    panel.hidden = true;
    return;
  }
  if (!panel) {
    panel = document.createElement("blockquote");
    panel.className = "passage";
    panel.id = `passage-${Math.random().toString(36).slice(2)}`;
    link.setAttribute("aria-controls", panel.id);
    panel.textContent = "loading…";
    item.append(panel);
    try {
      const r = await fetch(link.href, {headers: authHeaders()});
      const data = await r.json();
      panel.textContent = r.ok ? data.text : (data.error && data.error.message) || "not found";
    } catch (e) {
      panel.textContent = `could not load the passage: ${e}`;
    }
  }
  panel.hidden = false;
  link.setAttribute("aria-expanded", "true");
}

function showCitations(box, citations) {
  if (!citations || !citations.length) return;
  const list = document.createElement("ol");
  list.className = "citations";
  list.setAttribute("aria-label", "Sources");
  for (const c of citations) {
    const item = document.createElement("li");
    item.value = c.number;
    const link = document.createElement("a");
    link.href = `/v1/passages/${encodeURIComponent(c.id)}`;
    link.textContent = `[${c.number}] ${c.title}`;
    link.setAttribute("aria-expanded", "false");
    link.addEventListener("click", (ev) => { ev.preventDefault(); togglePassage(link, item); });
    const src = document.createElement("span");
    src.className = "muted";
    src.textContent = ` — ${c.source}`;
    item.append(link, src);
    list.append(item);
  }
  box.append(list);
}

function settings() {
  return {
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Math.max(1, Math.min(Number($("max-tokens").value) || 256, Number($("max-tokens").max))),
    retrieval: $("retrieval").checked,
  };
}

// Yields the parsed `data:` payloads of an SSE response body.
async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

async function send(text) {
  turns.push({role: "user", content: text});
  addMessage("user", text);
  const box = addMessage("assistant", "");
  box.setAttribute("aria-busy", "true");
  const body = box.querySelector(".body");
  controller = new AbortController();
  setBusy(true);
  $("status").textContent = "";
  let reply = "";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: {"Content-Type": "application/json", ...authHeaders()},
      body: JSON.stringify({messages: turns, stream: true, ...settings()}),
      signal: controller.signal,
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      if (r.status === 401) askForKey("this server needs an API key: enter it under Settings");
      throw new Error((err.error && err.error.message) || `HTTP ${r.status}`);
    }
    for await (const ev of sseEvents(r.body)) {
      if (ev.error) throw new Error(ev.error.message);
      const choice = ev.choices && ev.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        reply += choice.delta.content;
        body.textContent = reply;
        box.scrollIntoView({block: "end"});
      }
      if (choice.finish_reason) {
        showCitations(box, ev.citations);
        if (ev.tokens_per_second != null) $("status").textContent = `${ev.tokens_per_second} tokens/s`;
      }
    }
  } catch (e) {
    if (e.name === "AbortError") {
      $("status").textContent = "stopped";
    } else {
      const err = document.createElement("p");
      err.className = "error";
      err.textContent = `Error: ${e.message}`;
      box.append(err);
    }
  } finally {
    box.removeAttribute("aria-busy");
    controller = null;
    setBusy(false);
  }
  if (reply) turns.push({role: "assistant", content: reply});
  else if (turns.length && turns[turns.length - 1].role === "user") turns.pop();
}

function newChat() {
  if (controller) controller.abort();
  turns.length = 0;
  $("log").replaceChildren();
  $("status").textContent = "new chat";
  $("prompt").focus();
}

async function loadInfo() {
  try {
    const info = await (await fetch("/health")).json();
    $("model").textContent = `${info.model} · context ${info.context}`;
    if (info.auth && !sessionStorage.getItem("supermix-api-key")) {
      askForKey("this server needs an API key: enter it under Settings");
    }
    const most = info.max_tokens_limit || info.context;
    $("max-tokens").max = most;
    if (Number($("max-tokens").value) > most) $("max-tokens").value = most;
    if (!info.retrieval) {
      $("retrieval").checked = false;
      $("retrieval").disabled = true;
      $("retrieval").title = "no retrieval index loaded";
    }
  } catch (e) {
    $("model").textContent = "server unreachable";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  for (const [input, out] of [["temperature", "temperature-out"], ["top-p", "top-p-out"]]) {
    $(input).addEventListener("input", () => { $(out).textContent = $(input).value; });
  }
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      $("composer").requestSubmit();
    }
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && controller) controller.abort();
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("new-chat").addEventListener("click", newChat);
  $("api-key").value = sessionStorage.getItem("supermix-api-key") || "";
  $("api-key").addEventListener("change", () => {
    const key = $("api-key").value.trim();
    if (key) sessionStorage.setItem("supermix-api-key", key);
    else sessionStorage.removeItem("supermix-api-key");
  });
  loadInfo();
  $("prompt").focus();
});
