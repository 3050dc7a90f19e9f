// The dashboard: plain DOM code against the admin API and /v1. No build step, no
// third-party code; the admin token lives in sessionStorage for this tab only.
"use strict";

const $ = (selector) => document.querySelector(selector);
const state = { token: sessionStorage.getItem("mimoserve-admin") || "", account: "default", chat: null };
const COLORS = ["#e8590c", "#1c7ed6", "#2f9e44", "#ae3ec9", "#f59f00", "#0ca678", "#e03131", "#5c7cfa"];

class ApiError extends Error {}

async function admin(path, options = {}) {
  const response = await fetch(`/admin${path}`, {
    ...options,
    headers: { "authorization": `Bearer ${state.token}`, "content-type": "application/json" },
  });
  if (response.status === 204) return null;
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(body.error ? body.error.message : `HTTP ${response.status}`);
  return body;
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text == null ? "–" : String(text);
  row.appendChild(td);
  return td;
}

const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "never");

// ---- sign-in -------------------------------------------------------------------------

async function signIn(token) {
  state.token = token;
  try {
    await admin("/accounts");
  } catch (error) {
    state.token = "";
    sessionStorage.removeItem("mimoserve-admin");
    $("#signin-error").textContent = error.message;
    return;
  }
  sessionStorage.setItem("mimoserve-admin", token);
  $("#signin").hidden = true;
  $("#tabs").hidden = false;
  showTab("keys");
}

function showTab(name) {
  for (const section of document.querySelectorAll(".tab")) section.hidden = section.id !== name;
  for (const button of document.querySelectorAll("#tabs [data-tab]")) {
    button.classList.toggle("active", button.dataset.tab === name);
  }
  if (name === "keys") loadAccounts();
  if (name === "usage") loadUsage();
  if (name === "playground") loadModels();
}

// ---- accounts and keys ----------------------------------------------------------------

async function loadAccounts() {
  const accounts = await admin("/accounts");
  const body = $("#accounts-table tbody");
  body.replaceChildren();
  for (const account of accounts) {
    const row = document.createElement("tr");
    row.dataset.id = account.id;
    row.classList.toggle("selected", account.id === state.account);
    cell(row, account.name);
    cell(row, account.id);
    cell(row, account.limits.rpm);
    cell(row, account.limits.tpm);
    row.addEventListener("click", () => { state.account = account.id; loadAccounts(); });
    body.appendChild(row);
  }
  const selected = accounts.find((a) => a.id === state.account);
  $("#keys-account").textContent = selected ? selected.name : state.account;
  await loadKeys();
}

async function loadKeys() {
  const keys = await admin(`/keys?account_id=${encodeURIComponent(state.account)}`);
  const body = $("#keys-table tbody");
  body.replaceChildren();
  for (const key of keys) {
    const row = document.createElement("tr");
    row.dataset.id = key.id;
    cell(row, key.name);
    cell(row, `${key.prefix}…`);
    cell(row, when(key.created_at));
    cell(row, when(key.last_used_at));
    const expired = key.expires_at && key.expires_at * 1000 < Date.now();
    cell(row, key.revoked_at ? "revoked" : expired ? "expired" : "active");
    const actions = cell(row, "");
    if (!key.revoked_at) {
      const revoke = document.createElement("button");
      revoke.textContent = "Revoke";
      revoke.className = "revoke";
      revoke.addEventListener("click", async () => {
        if (!confirm(`Revoke the key "${key.name}"? Clients using it are refused at once.`)) return;
        await admin(`/keys/${key.id}`, { method: "DELETE" });
        await loadKeys();
      });
      actions.appendChild(revoke);
    }
    body.appendChild(row);
  }
}

function optionalInt(value) {
  return value === "" ? null : Number.parseInt(value, 10);
}

async function createAccount(event) {
  event.preventDefault();
  const form = event.target;
  try {
    const account = await admin("/accounts", {
      method: "POST",
      body: JSON.stringify({
        name: form.name.value, rpm: optionalInt(form.rpm.value), tpm: optionalInt(form.tpm.value),
      }),
    });
    state.account = account.id;
    form.reset();
    $("#keys-error").textContent = "";
    await loadAccounts();
  } catch (error) {
    $("#keys-error").textContent = error.message;
  }
}

async function createKey(event) {
  event.preventDefault();
  const form = event.target;
  const models = form.models.value.split(",").map((m) => m.trim()).filter(Boolean);
  try {
    const created = await admin(`/accounts/${encodeURIComponent(state.account)}/keys`, {
      method: "POST",
      body: JSON.stringify({ name: form.name.value, allowed_models: models.length ? models : null }),
    });
    // The secret exists only here, in this page's memory, until the page is left.
    $("#new-key-secret").textContent = created.key;
    $("#new-key").hidden = false;
    $("#copy-status").textContent = "";
    $("#chat-key").value = created.key;
    form.reset();
    $("#keys-error").textContent = "";
    await loadKeys();
  } catch (error) {
    $("#keys-error").textContent = error.message;
  }
}

async function copyKey() {
  const secret = $("#new-key-secret").textContent;
  try {
    await navigator.clipboard.writeText(secret);
    $("#copy-status").textContent = "Copied.";
  } catch {
    // No clipboard permission (plain http, some browsers): select it for Ctrl+C instead.
    const range = document.createRange();
    range.selectNodeContents($("#new-key-secret"));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    $("#copy-status").textContent = "Selected: press Ctrl+C.";
  }
}

// ---- usage ------------------------------------------------------------------------------

async function loadUsage(event) {
  if (event) event.preventDefault();
  const hours = Number($("#usage-form").hours.value);
  const step = hours <= 1 ? 60 : hours <= 24 ? 3600 : 21600;
  const [points, totals] = await Promise.all([
    admin(`/usage/series?hours=${hours}&step_s=${step}`),
    admin(`/usage?hours=${hours}`),
  ]);
  const start = Math.floor((Date.now() / 1000 - hours * 3600) / step) * step;
  drawChart($("#chart-models"), points, (p) => p.model, start, step, hours);
  drawChart($("#chart-keys"), points, (p) => p.key_id, start, step, hours);
  const body = $("#usage-table tbody");
  body.replaceChildren();
  for (const t of totals) {
    const row = document.createElement("tr");
    for (const value of [t.key_id, t.model, t.requests, t.prompt_tokens, t.completion_tokens,
                         t.reasoning_tokens, t.cached_tokens]) cell(row, value);
    body.appendChild(row);
  }
}

function svg(name, attributes) {
  const element = document.createElementNS("http://www.w3.org/2000/svg", name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  return element;
}

// Stacked bars of tokens (prompt + completion) per bucket, one colour per series.
function drawChart(container, points, seriesOf, start, step, hours) {
  const buckets = Math.ceil((hours * 3600) / step) + 1;
  const names = [...new Set(points.map(seriesOf))].sort();
  const totals = Array.from({ length: buckets }, () => new Map());
  for (const p of points) {
    const index = Math.round((p.start - start) / step);
    if (index < 0 || index >= buckets) continue;
    const name = seriesOf(p);
    totals[index].set(name, (totals[index].get(name) || 0) + p.prompt_tokens + p.completion_tokens);
  }
  const peak = Math.max(1, ...totals.map((m) => [...m.values()].reduce((a, b) => a + b, 0)));
  const width = 800, height = 200, pad = 28, barWidth = (width - pad) / buckets;
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img",
                             "aria-label": `tokens per ${names.length} series` });
  chart.appendChild(svg("text", { x: 2, y: 12, "font-size": 10, fill: "#66707a" })).textContent = String(peak);
  chart.appendChild(svg("line", { x1: pad, y1: height - 14, x2: width, y2: height - 14, stroke: "#d8dde2" }));
  totals.forEach((byName, i) => {
    let y = height - 14;
    names.forEach((name, n) => {
      const value = byName.get(name) || 0;
      if (!value) return;
      const h = ((height - 30) * value) / peak;
      y -= h;
      const bar = svg("rect", { x: pad + i * barWidth + 1, y, width: Math.max(1, barWidth - 2), height: h,
                                fill: COLORS[n % COLORS.length], class: "bar" });
      bar.appendChild(svg("title", {})).textContent =
        `${name}: ${value} tokens, ${new Date((start + i * step) * 1000).toLocaleString()}`;
      chart.appendChild(bar);
    });
  });
  const legend = document.createElement("div");
  legend.className = "legend";
  names.forEach((name, n) => {
    const item = document.createElement("span");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = COLORS[n % COLORS.length];
    item.append(swatch, name);
    legend.appendChild(item);
  });
  if (!names.length) legend.textContent = "No requests in this period.";
  container.replaceChildren(chart, legend);
}

// ---- playground ---------------------------------------------------------------------------

async function loadModels() {
  const select = $("#chat-model");
  if (select.options.length) return;
  // Model ids are public within the server; the key field may still be empty here.
  for (const id of ["mimo-v2-flash", "mimo-v2-pro", "mimo-v2-omni"]) select.add(new Option(id, id));
  const key = $("#chat-key").value;
  if (!key) return;
  const response = await fetch("/v1/models", { headers: { "api-key": key } });
  if (!response.ok) return;
  select.replaceChildren(...(await response.json()).data.map((m) => new Option(m.id, m.id)));
}

const WEATHER_TOOL = {
  type: "function",
  function: {
    name: "get_weather",
    description: "Current weather for a city",
    parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
  },
};

// Server-sent events from a fetch body: `data: {...}` lines separated by blank lines.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

async function sendChat(event) {
  event.preventDefault();
  const outputs = { reasoning: $("#out-reasoning"), content: $("#out-content"), tools: $("#out-tools") };
  Object.values(outputs).forEach((o) => { o.textContent = ""; });
  const status = $("#chat-status");
  status.textContent = "Waiting for the first token…";
  const body = {
    model: $("#chat-model").value,
    messages: [{ role: "user", content: $("#chat-input").value }],
    stream: true,
    stream_options: { include_usage: true },
    thinking: { type: $("#chat-thinking").checked ? "enabled" : "disabled" },
  };
  if ($("#chat-tools").checked) body.tools = [WEATHER_TOOL];
  state.chat = new AbortController();
  $("#chat-send").disabled = true;
  $("#chat-stop").disabled = false;
  const calls = [];
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json", "api-key": $("#chat-key").value },
      body: JSON.stringify(body),
      signal: state.chat.signal,
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new ApiError(error.error ? error.error.message : `HTTP ${response.status}`);
    }
    status.textContent = "Streaming…";
    for await (const data of sseEvents(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(chunk.error.message);
      if (chunk.usage) {
        const u = chunk.usage;
        status.textContent = `Done: ${u.prompt_tokens} prompt + ${u.completion_tokens} completion tokens.`;
      }
      for (const choice of chunk.choices || []) {
        const delta = choice.delta || {};
        if (delta.reasoning_content) outputs.reasoning.textContent += delta.reasoning_content;
        if (delta.content) outputs.content.textContent += delta.content;
        for (const call of delta.tool_calls || []) {
          const slot = calls[call.index] || (calls[call.index] = { name: "", arguments: "" });
          if (call.function && call.function.name) slot.name = call.function.name;
          if (call.function && call.function.arguments) slot.arguments += call.function.arguments;
        }
        if (calls.length) outputs.tools.textContent = calls.map((c) => `${c.name}(${c.arguments})`).join("\n");
      }
    }
  } catch (error) {
    status.textContent = error.name === "AbortError" ? "Stopped." : `Error: ${error.message}`;
  } finally {
    $("#chat-send").disabled = false;
    $("#chat-stop").disabled = true;
  }
}

// ---- wiring -------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("#signin-form").addEventListener("submit", (e) => { e.preventDefault(); signIn($("#admin-token").value.trim()); });
  $("#sign-out").addEventListener("click", () => { sessionStorage.removeItem("mimoserve-admin"); location.reload(); });
  for (const button of document.querySelectorAll("#tabs [data-tab]")) {
    button.addEventListener("click", () => showTab(button.dataset.tab));
  }
  $("#account-form").addEventListener("submit", createAccount);
  $("#key-form").addEventListener("submit", createKey);
  $("#copy-key").addEventListener("click", copyKey);
  $("#usage-form").addEventListener("submit", loadUsage);
  $("#chat-form").addEventListener("submit", sendChat);
  $("#chat-stop").addEventListener("click", () => state.chat && state.chat.abort());
  if (state.token) signIn(state.token);
});
