// The chat page: conversations in localStorage, replies streamed from
// POST /v1/chat/completions (SSE read from fetch's ReadableStream), Stop aborts the fetch
// (the server sees the disconnect and aborts the request). With --api-key the page asks
// for the key once, keeps it in localStorage and sends it as "Authorization: Bearer".
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const KEYS = { convs: "tokenmill.conversations", current: "tokenmill.current",
               settings: "tokenmill.settings", apiKey: "tokenmill.apiKey" };

const load = (key, fallback) => {
  try { return JSON.parse(localStorage.getItem(key)) ?? fallback; } catch { return fallback; }
};

let conversations = load(KEYS.convs, []);
for (const c of conversations) {  // a reply cut off by closing the page
  for (const m of c.messages) if (m.streaming) { delete m.streaming; m.stopped = true; }
}
let currentId = localStorage.getItem(KEYS.current);
let model = null;
let busy = null;  // {controller, conv} while a reply streams

function saveConversations() {
  for (;;) {
    try {
      localStorage.setItem(KEYS.convs, JSON.stringify(conversations));
      return;
    } catch (e) {  // quota: drop the oldest other conversation and try again
      const oldest = conversations.findIndex((c) => c.id !== currentId);
      if (oldest < 0) throw e;
      conversations.splice(oldest, 1);
    }
  }
}

const current = () => conversations.find((c) => c.id === currentId) ?? null;

function select(id) {
  currentId = id;
  if (id) localStorage.setItem(KEYS.current, id); else localStorage.removeItem(KEYS.current);
  renderList();
  renderMessages();
}

// ---------------------------------------------------------------- settings and API key

const SETTINGS = { system: "system-prompt", temperature: "temperature",
                   maxTokens: "max-tokens", extra: "extra-json" };
const saved = load(KEYS.settings, {});
for (const [name, id] of Object.entries(SETTINGS)) {
  if (saved[name] !== undefined) $(id).value = saved[name];
  $(id).addEventListener("change", () => {
    const s = {};
    for (const [n, i] of Object.entries(SETTINGS)) s[n] = $(i).value;
    localStorage.setItem(KEYS.settings, JSON.stringify(s));
  });
}

let keyWaiters = [];
function askForKey(refused) {
  $("key-error").hidden = !refused;
  if (!$("key-dialog").open) $("key-dialog").showModal();
  $("api-key").focus();
  return new Promise((resolve) => keyWaiters.push(resolve));
}
$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  localStorage.setItem(KEYS.apiKey, $("api-key").value.trim());
  $("api-key").value = "";
  $("key-dialog").close();
  const waiters = keyWaiters;
  keyWaiters = [];
  waiters.forEach((resolve) => resolve());
});
$("forget-key").addEventListener("click", () => localStorage.removeItem(KEYS.apiKey));

// fetch with the key; a 401 asks for a (new) key and tries again (Stop ends the wait)
async function api(path, init = {}) {
  for (;;) {
    const key = localStorage.getItem(KEYS.apiKey);
    const headers = { ...(init.headers || {}) };
    if (key) headers.Authorization = `Bearer ${key}`;
    const res = await fetch(path, { ...init, headers });
    if (res.status !== 401) return res;
    const signal = init.signal;
    await Promise.race([askForKey(Boolean(key)), new Promise((_, reject) => {
      const stop = () => reject(new DOMException("stopped", "AbortError"));
      if (signal?.aborted) stop(); else signal?.addEventListener("abort", stop);
    })]);
  }
}

async function errorText(res) {
  try {
    const body = await res.json();
    return body?.error?.message || JSON.stringify(body);
  } catch {
    return `${res.status} ${res.statusText}`;
  }
}

async function loadModel() {
  try {
    const res = await api("/v1/models");
    if (!res.ok) throw new Error(await errorText(res));
    model = (await res.json()).data[0]?.id ?? null;
    $("model-name").textContent = model ?? "(no model)";
  } catch (e) {
    $("model-name").textContent = `server not reachable: ${e.message}`;
  }
}

// ---------------------------------------------------------------- rendering

function renderList() {
  const list = $("conversations");
  list.replaceChildren();
  for (const c of [...conversations].sort((a, b) => b.updated - a.updated)) {
    const li = document.createElement("li");
    li.className = c.id === currentId ? "active" : "";
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = c.title || "New chat";
    open.title = c.title || "";
    open.addEventListener("click", () => select(c.id));
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.textContent = "×";
    del.title = "Delete this conversation";
    del.addEventListener("click", () => remove(c.id));
    li.append(open, del);
    list.append(li);
  }
}

function messageElement(msg) {
  const el = document.createElement("div");
  el.className = `msg ${msg.role}`;
  const content = document.createElement("div");
  content.className = "content";
  const meta = document.createElement("div");
  meta.className = "meta";
  el.append(content, meta);
  fillMessage(el, msg);
  return el;
}

function fillMessage(el, msg) {
  const content = el.querySelector(".content");
  if (msg.role === "user") content.textContent = msg.content;
  else content.innerHTML = renderMarkdown(msg.content);
  for (const pre of content.querySelectorAll("pre")) {
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy";
    copy.textContent = "copy";
    const code = pre.querySelector("code").textContent;
    copy.addEventListener("click", () => navigator.clipboard?.writeText(code));
    pre.append(copy);
  }
  const parts = [];
  if (msg.tokens) parts.push(`${msg.tokens} tokens`);
  if (msg.tps) parts.push(`${msg.tps.toFixed(1)} tok/s`);
  if (msg.stopped) parts.push("stopped");
  if (msg.finish === "length") parts.push("max tokens reached");
  el.querySelector(".meta").textContent = parts.join(" · ");
  el.classList.toggle("streaming", Boolean(msg.streaming));
  if (msg.error) {
    const err = document.createElement("div");
    err.className = "error";
    err.textContent = msg.error;
    content.append(err);
  }
}

function renderMessages() {
  const box = $("messages");
  box.replaceChildren(...(current()?.messages ?? []).map(messageElement));
  box.scrollTop = box.scrollHeight;
}

function setBusy(state) {
  busy = state;
  $("send").hidden = Boolean(state);
  $("stop").hidden = !state;
}

// ---------------------------------------------------------------- conversations

function newConversation() {
  const conv = { id: `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`,
                 title: "", messages: [], updated: Date.now() };
  conversations.push(conv);
  return conv;
}

function remove(id) {
  if (busy?.conv.id === id) busy.controller.abort();
  conversations = conversations.filter((c) => c.id !== id);
  saveConversations();
  select(currentId === id ? null : currentId);
}

$("new-chat").addEventListener("click", () => {
  select(null);
  $("input").focus();
});

// ---------------------------------------------------------------- sending and streaming

function requestBody(conv) {
  const messages = [];
  const system = $("system-prompt").value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const m of conv.messages) {
    if (!m.streaming && !m.error && m.content) messages.push({ role: m.role, content: m.content });
  }
  const body = { messages, stream: true, stream_options: { include_usage: true } };
  if (model) body.model = model;
  const temperature = parseFloat($("temperature").value);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  const extra = $("extra-json").value.trim();
  if (extra) Object.assign(body, JSON.parse(extra));  // a bad JSON throws: shown to the user
  return body;
}

// Yields each SSE event's data payload.
async function* sseData(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    const events = buffer.split(/\r?\n\r?\n/);
    buffer = events.pop();
    for (const event of events) {
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data) yield data;
    }
  }
}

async function send() {
  const text = $("input").value;
  if (busy || !text.trim()) return;
  let conv = current();
  if (!conv) {
    conv = newConversation();
    select(conv.id);
  }
  if (!conv.title) conv.title = text.trim().slice(0, 60);
  conv.messages.push({ role: "user", content: text });
  const reply = { role: "assistant", content: "", streaming: true };
  const controller = new AbortController();
  setBusy({ controller, conv });
  $("input").value = "";
  let body;
  try {
    body = requestBody(conv);
  } catch (e) {
    reply.error = `Extra request fields: ${e.message}`;
  }
  conv.messages.push(reply);
  conv.updated = Date.now();
  saveConversations();
  renderList();
  renderMessages();
  let el = $("messages").lastElementChild;
  const show = () => {
    if (currentId !== conv.id) return;
    const box = $("messages");
    if (!el.isConnected) el = box.lastElementChild;  // switched away and back: re-rendered
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    fillMessage(el, reply);
    if (atBottom) box.scrollTop = box.scrollHeight;
  };

  const started = performance.now();
  let first = null;
  let chunks = 0;
  try {
    if (reply.error) return;
    const res = await api("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), signal: controller.signal });
    if (!res.ok) {
      reply.error = await errorText(res);
      return;
    }
    for await (const data of sseData(res)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) {
        reply.error = chunk.error.message || JSON.stringify(chunk.error);
        break;
      }
      const choice = chunk.choices?.[0];
      const delta = choice?.delta?.content;
      if (delta) {
        first ??= performance.now();
        chunks += 1;
        reply.content += delta;
        reply.tokens = chunks;
        show();
      }
      if (choice?.finish_reason) reply.finish = choice.finish_reason;
      if (chunk.usage) reply.tokens = chunk.usage.completion_tokens;
    }
  } catch (e) {
    if (e.name === "AbortError") reply.stopped = true;
    else reply.error = `${e.message}`;
  } finally {
    const end = performance.now();
    if (first !== null && reply.tokens > 1 && end > first) {
      reply.tps = (reply.tokens - 1) / ((end - first) / 1000);
    }
    delete reply.streaming;
    conv.updated = Date.now();
    saveConversations();
    setBusy(null);
    show();
    const tokens = reply.tokens ? `${reply.tokens} tokens` : "";
    $("speed").textContent = reply.tps
      ? `${tokens}, ${reply.tps.toFixed(1)} tok/s (first token after ${((first - started) / 1000).toFixed(2)} s)`
      : tokens;
  }
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  send();
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    send();
  }
});
$("stop").addEventListener("click", () => busy?.controller.abort());
document.addEventListener("keydown", (ev) => {
  if (ev.key === "Escape" && busy && !$("key-dialog").open) busy.controller.abort();
});

renderList();
renderMessages();
loadModel();
