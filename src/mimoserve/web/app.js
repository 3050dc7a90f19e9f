// The dashboard: plain DOM code against the admin API and /v1. No build step, no
// third-party code; the admin token lives in sessionStorage for this tab only.
"use strict";

const $ = (selector) => document.querySelector(selector);
const state = { token: sessionStorage.getItem("mimoserve-admin") || "", account: "default", chat: null,
                accounts: [], keys: [] };
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
  if (name === "requests") loadRequestFilters().then(() => loadRequests());
  if (name === "connect") showSnippets();
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
  state.accounts = accounts;
  const selected = accounts.find((a) => a.id === state.account);
  $("#keys-account").textContent = selected ? selected.name : state.account;
  $("#limits-account").textContent = selected ? selected.name : state.account;
  const limitsForm = $("#account-limits-form");
  limitsForm.rpm.value = selected && selected.limits.rpm != null ? selected.limits.rpm : "";
  limitsForm.tpm.value = selected && selected.limits.tpm != null ? selected.limits.tpm : "";
  await loadKeys();
}

// A request refused before it named a model (bad JSON, a 401) is recorded without one.
const modelName = (model) => model || "(no model)";
const money = (amount, currency) => `${amount.toFixed(amount < 1 ? 6 : 2)} ${currency}`;
const inUnit = (budget, amount) =>
  budget.unit === "tokens" ? `${Math.round(amount)} tokens` : money(amount, budget.currency);

async function loadKeys() {
  const keys = await admin(`/keys?account_id=${encodeURIComponent(state.account)}`);
  state.keys = keys;
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
    const own = key.limits;
    cell(row, own.rpm == null && own.tpm == null && own.max_concurrent == null ? "account's"
      : [own.rpm, own.tpm, own.max_concurrent].map((v) => (v == null ? "–" : v)).join(" / "));
    const spend = key.spend_this_month;
    cell(row, spend ? `${spend.tokens} tokens · ${money(spend.cost, spend.currency)}` : null);
    const left = cell(row, key.budget ? inUnit(key.budget, key.budget.remaining) : "no budget");
    if (key.budget && key.budget.over_soft) left.classList.add("warn");
    const actions = cell(row, "");
    if (!key.revoked_at) {
      const edit = document.createElement("button");
      edit.textContent = "Limits";
      edit.className = "limits";
      edit.addEventListener("click", () => editKeyLimits(key));
      actions.appendChild(edit);
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
  await loadBudgets();  // budgets name keys: after them
}

async function loadBudgets() {
  const budgets = await admin("/budgets");
  const account = state.accounts.find((a) => a.id === state.account);
  const names = new Map([...state.accounts.map((a) => [`account:${a.id}`, `account ${a.name}`]),
                         ...state.keys.map((k) => [`key:${k.id}`, `key ${k.name}`])]);
  const body = $("#budgets-table tbody");
  body.replaceChildren();
  for (const budget of budgets) {
    const row = document.createElement("tr");
    row.dataset.owner = `${budget.scope}:${budget.owner}`;
    cell(row, names.get(row.dataset.owner) || `${budget.scope} ${budget.owner}`);
    cell(row, budget.unit === "tokens" ? "tokens" : budget.currency);
    cell(row, { day: "per day (UTC)", month: "per month (UTC)", none: "in total" }[budget.period]);
    cell(row, inUnit(budget, budget.amount));
    cell(row, inUnit(budget, budget.spent));
    cell(row, inUnit(budget, budget.reserved));
    cell(row, inUnit(budget, budget.remaining));
    const status = cell(row, budget.remaining <= 0 ? "spent (402)"
      : budget.over_soft ? `over ${budget.soft_percent} %` : "ok");
    status.classList.toggle("warn", budget.over_soft);
    const actions = cell(row, "");
    for (const [label, method, path] of [["Reset", "POST", "/reset"], ["Remove", "DELETE", ""]]) {
      const button = document.createElement("button");
      button.textContent = label;
      button.className = label.toLowerCase();
      button.addEventListener("click", async () => {
        await admin(`/budgets/${budget.scope}/${budget.owner}${path}`, { method });
        await loadKeys();
      });
      actions.appendChild(button);
    }
    body.appendChild(row);
  }
  const owner = $("#budget-form").owner;
  owner.replaceChildren(new Option(`account ${account ? account.name : state.account}`,
                                   `account:${state.account}`));
  for (const key of state.keys.filter((k) => !k.revoked_at)) {
    owner.add(new Option(`key ${key.name}`, `key:${key.id}`));
  }
}

async function setBudget(event) {
  event.preventDefault();
  const form = event.target;
  const [scope, id] = form.owner.value.split(":");
  await reporting("#budgets-error", async () => {
    await admin(`/budgets/${scope}/${encodeURIComponent(id)}`, {
      method: "PUT",
      body: JSON.stringify({
        unit: form.unit.value, amount: Number(form.amount.value), period: form.period.value,
        soft_percent: Number.parseInt(form.soft.value, 10),
      }),
    });
    form.amount.value = "";
    await loadKeys();
  });
}

function editKeyLimits(key) {
  const form = $("#key-limits-form");
  form.dataset.key = key.id;
  $("#limits-key").textContent = key.name;
  for (const name of ["rpm", "tpm", "max_concurrent"]) {
    form[name].value = key.limits[name] == null ? "" : key.limits[name];
  }
  form.hidden = false;
}

async function saveKeyLimits(event) {
  event.preventDefault();
  const form = event.target;
  await reporting("#keys-error", async () => {
    await admin(`/keys/${encodeURIComponent(form.dataset.key)}`, {
      method: "PATCH",
      body: JSON.stringify({ rpm: optionalInt(form.rpm.value), tpm: optionalInt(form.tpm.value),
                             max_concurrent: optionalInt(form.max_concurrent.value) }),
    });
    form.hidden = true;
    await loadKeys();
  });
}

async function saveAccountLimits(event) {
  event.preventDefault();
  const form = event.target;
  await reporting("#keys-error", async () => {
    await admin(`/accounts/${encodeURIComponent(state.account)}`, {
      method: "PATCH",
      body: JSON.stringify({ rpm: optionalInt(form.rpm.value), tpm: optionalInt(form.tpm.value) }),
    });
    await loadAccounts();
  });
}

// Runs a form's action: its failure is shown in `errorBox`, a success clears it.
async function reporting(errorBox, action) {
  try {
    await action();
    $(errorBox).textContent = "";
  } catch (error) {
    $(errorBox).textContent = error.message;
  }
}

function optionalInt(value) {
  return value === "" ? null : Number.parseInt(value, 10);
}

async function createAccount(event) {
  event.preventDefault();
  const form = event.target;
  await reporting("#keys-error", async () => {
    const account = await admin("/accounts", {
      method: "POST",
      body: JSON.stringify({
        name: form.name.value, rpm: optionalInt(form.rpm.value), tpm: optionalInt(form.tpm.value),
      }),
    });
    state.account = account.id;
    form.reset();
    await loadAccounts();
  });
}

async function createKey(event) {
  event.preventDefault();
  const form = event.target;
  const models = form.models.value.split(",").map((m) => m.trim()).filter(Boolean);
  await reporting("#keys-error", async () => {
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
    await loadKeys();
  });
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
  const tokens = points.reduce((sum, p) => sum + p.prompt_tokens + p.completion_tokens, 0);
  const requests = points.reduce((sum, p) => sum + p.requests, 0);
  const cost = totals.reduce((sum, t) => sum + t.cost, 0);
  const currency = totals.length ? totals[0].currency : "";
  $("#usage-summary").textContent =
    `${requests} requests, ${tokens} tokens` + (currency ? `, ${money(cost, currency)}` : "");
  for (const id of ["#total-models", "#total-keys"]) $(id).textContent = `(${tokens} in total)`;
  drawChart($("#chart-models"), points, (p) => modelName(p.model), start, step, hours);
  drawChart($("#chart-keys"), points, (p) => p.key_id, start, step, hours);
  const body = $("#usage-table tbody");
  body.replaceChildren();
  for (const t of totals) {
    const row = document.createElement("tr");
    for (const value of [t.key_id, modelName(t.model), t.requests, t.prompt_tokens, t.completion_tokens,
                         t.reasoning_tokens, t.cached_tokens, hitRate(t), acceptance(t),
                         money(t.cost, t.currency)]) cell(row, value);
    body.appendChild(row);
  }
}

// The prefix cache's hit rate: the share of prompt tokens served from any cache tier.
function hitRate(total) {
  if (!total.prompt_tokens) return "-";
  return `${Math.round((100 * total.cached_tokens) / total.prompt_tokens)}%`;
}

// Speculative decoding's acceptance rate: of the tokens guessed and verified, the share
// the model kept ("-" where nothing was guessed).
function acceptance(total) {
  if (!total.draft_tokens) return "-";
  const rate = Math.round((100 * total.accepted_draft_tokens) / total.draft_tokens);
  return `${rate}% of ${total.draft_tokens}`;
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
  chart.appendChild(svg("text", { x: 2, y: 12, class: "axis" })).textContent = String(peak);
  chart.appendChild(svg("line", { x1: pad, y1: height - 14, x2: width, y2: height - 14, stroke: "#d8dde2" }));
  // The time axis: about six labels, times for a day or less, dates beyond.
  const every = Math.max(1, Math.round(buckets / 6));
  for (let i = 0; i < buckets; i += every) {
    const at = new Date((start + i * step) * 1000);
    const label = hours <= 24 ? at.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
      : at.toLocaleDateString([], { month: "short", day: "numeric" }) + " "
        + at.toLocaleTimeString([], { hour: "2-digit" });
    const tick = svg("text", { x: pad + i * barWidth, y: height - 2, class: "axis tick" });
    tick.textContent = label;
    chart.appendChild(tick);
  }
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

async function exportCsv() {
  const hours = Number($("#usage-form").hours.value);
  const response = await fetch(`/admin/usage.csv?hours=${hours}`, {
    headers: { "authorization": `Bearer ${state.token}` },
  });
  if (!response.ok) return;
  const name = (response.headers.get("content-disposition") || "").match(/filename="([^"]+)"/);
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await response.blob());
  link.download = name ? name[1] : "mimoserve-usage.csv";
  document.body.appendChild(link);
  link.click();
  link.remove();
}

// ---- requests ------------------------------------------------------------------------------

const requestPages = { cursors: [null], index: 0, next: null };

async function loadRequestFilters() {
  const form = $("#requests-form");
  if (form.key.options.length > 1) return;
  // Keys and models seen in the last year's usage, named where the key still exists.
  const [keys, usage] = await Promise.all([admin("/keys"), admin("/usage?hours=8784")]);
  const names = new Map(keys.map((k) => [k.id, k.name]));
  for (const id of [...new Set([...names.keys(), ...usage.map((u) => u.key_id)])].sort()) {
    form.key.add(new Option(names.has(id) ? `${names.get(id)} (${id})` : id, id));
  }
  for (const model of [...new Set(usage.map((u) => u.model))].sort()) {
    form.model.add(new Option(modelName(model), model));
  }
}

async function loadRequests(event) {
  if (event) {
    event.preventDefault();
    Object.assign(requestPages, { cursors: [null], index: 0 });
  }
  const form = $("#requests-form");
  const query = new URLSearchParams({ limit: "25" });
  if (form.key.value) query.set("key_id", form.key.value);
  if (form.model.value) query.set("model", form.model.value);
  if (form.status.value) query.set("status", form.status.value);
  const before = requestPages.cursors[requestPages.index];
  if (before) query.set("before", before);
  const page = await admin(`/requests?${query}`);
  requestPages.next = page.next_before;
  const body = $("#requests-table tbody");
  body.replaceChildren();
  for (const r of page.data) {
    const row = document.createElement("tr");
    row.classList.toggle("failed", r.status >= 400);
    for (const value of [new Date(r.time * 1000).toLocaleString(), r.key_id, modelName(r.model),
                         r.door, r.status, r.prompt_tokens, r.completion_tokens, r.cached_tokens,
                         r.ttft_s == null ? null : `${r.ttft_s.toFixed(2)} s`,
                         `${r.duration_s.toFixed(2)} s`, r.cost.toFixed(6), r.request_id]) cell(row, value);
    body.appendChild(row);
  }
  if (!page.data.length) {
    const row = document.createElement("tr");
    cell(row, "No requests match.").colSpan = 12;
    body.appendChild(row);
  }
  $("#requests-newer").disabled = requestPages.index === 0;
  $("#requests-older").disabled = page.next_before == null;
  $("#requests-page").textContent = `page ${requestPages.index + 1}, newest first`;
}

function pageRequests(step) {
  if (step > 0) {
    requestPages.cursors[requestPages.index + 1] = requestPages.next;
  }
  requestPages.index += step;
  loadRequests();
}

// ---- connect a client ---------------------------------------------------------------------

function showSnippets() {
  const base = location.origin;
  $("#snippet-openai").textContent = `import os, openai

client = openai.OpenAI(base_url="${base}/v1", api_key=os.environ["MIMO_API_KEY"])
answer = client.chat.completions.create(
    model="mimo-v2-flash", messages=[{"role": "user", "content": "Hello!"}])
print(answer.choices[0].message.content)`;
  $("#snippet-curl").textContent = `curl ${base}/v1/chat/completions \\
  -H "Content-Type: application/json" -H "api-key: $MIMO_API_KEY" \\
  -d '{"model": "mimo-v2-flash", "messages": [{"role": "user", "content": "Hello!"}]}'`;
  $("#snippet-claude").textContent = `export ANTHROPIC_BASE_URL=${base}/anthropic
export ANTHROPIC_AUTH_TOKEN=$MIMO_API_KEY
export ANTHROPIC_MODEL=mimo-v2-flash ANTHROPIC_SMALL_FAST_MODEL=mimo-v2-flash
export CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1
# a long first prompt on a CPU takes minutes to read: wait for it
export API_TIMEOUT_MS=1200000 CLAUDE_STREAM_IDLE_TIMEOUT_MS=1200000
claude`;
  $("#snippet-codex").textContent = `model = "mimo-v2-flash"
model_provider = "mimo"

[model_providers.mimo]
name = "mimo"
base_url = "${base}/v1"
wire_api = "responses"
env_key = "MIMO_API_KEY"`;
}

// ---- playground ---------------------------------------------------------------------------

// Speech ids speak or listen; the rest chat. Design and clone ids are refused here anyway.
const isSpeaker = (id) => /(^|-)tts$/.test(id);
const isListener = (id) => /(^|-)asr$/.test(id);

function fillModels(ids) {
  const chat = ids.filter((id) => !/(^|-)(tts|asr)(-|$)/.test(id));
  $("#chat-model").replaceChildren(...chat.map((id) => new Option(id, id)));
  $("#speech-model").replaceChildren(...ids.filter(isSpeaker).map((id) => new Option(id, id)));
  $("#asr-model").replaceChildren(...ids.filter(isListener).map((id) => new Option(id, id)));
}

async function loadModels() {
  if ($("#chat-model").options.length) return;
  // Model ids are public within the server; the key field may still be empty here.
  fillModels(["mimo-v2-flash", "mimo-v2-pro", "mimo-v2-omni", "mimo-v2.5-tts", "mimo-v2.5-asr"]);
  const key = $("#chat-key").value;
  if (!key) return;
  const response = await fetch("/v1/models", { headers: { "api-key": key } });
  if (!response.ok) return;
  fillModels((await response.json()).data.map((m) => m.id));
}

async function apiError(response) {
  const error = await response.json().catch(() => ({}));
  return new ApiError(error.error ? error.error.message : `HTTP ${response.status}`);
}

// The answer (or, before one, the question) spoken by the speech model, played here.
async function speak() {
  const status = $("#speech-status");
  const text = $("#out-content").textContent.trim() || $("#chat-input").value.trim();
  status.textContent = "Synthesising…";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json", "api-key": $("#chat-key").value },
      body: JSON.stringify({
        model: $("#speech-model").value,
        messages: [{ role: "assistant", content: text }],
        audio: { format: "wav", voice: "mimo_default" },
      }),
    });
    if (!response.ok) throw await apiError(response);
    const answer = await response.json();
    const bytes = Uint8Array.from(atob(answer.choices[0].message.audio.data), (c) => c.charCodeAt(0));
    const audio = $("#speech-audio");
    audio.src = URL.createObjectURL(new Blob([bytes], { type: "audio/wav" }));
    audio.hidden = false;
    status.textContent = `Spoken: ${answer.usage.seconds} s of audio.`;
  } catch (error) {
    status.textContent = `Error: ${error.message}`;
  }
}

// An audio file written down by the recognition model, into the question box.
async function transcribe() {
  const status = $("#speech-status");
  const file = $("#asr-file").files[0];
  if (!file) { status.textContent = "Choose an audio file first."; return; }
  const form = new FormData();
  form.append("model", $("#asr-model").value);
  form.append("file", file);
  status.textContent = "Transcribing…";
  try {
    const response = await fetch("/v1/audio/transcriptions", {
      method: "POST", headers: { "api-key": $("#chat-key").value }, body: form,
    });
    if (!response.ok) throw await apiError(response);
    const heard = await response.json();
    $("#chat-input").value = heard.text;
    status.textContent = `Transcribed ${heard.usage.seconds} s of audio.`;
  } catch (error) {
    status.textContent = `Error: ${error.message}`;
  }
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
    if (!response.ok) throw await apiError(response);
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
  $("#budget-form").addEventListener("submit", setBudget);
  $("#account-limits-form").addEventListener("submit", saveAccountLimits);
  $("#key-limits-form").addEventListener("submit", saveKeyLimits);
  $("#key-limits-cancel").addEventListener("click", () => { $("#key-limits-form").hidden = true; });
  $("#export-csv").addEventListener("click", exportCsv);
  $("#requests-form").addEventListener("submit", loadRequests);
  $("#requests-newer").addEventListener("click", () => pageRequests(-1));
  $("#requests-older").addEventListener("click", () => pageRequests(1));
  $("#copy-key").addEventListener("click", copyKey);
  $("#usage-form").addEventListener("submit", loadUsage);
  $("#chat-form").addEventListener("submit", sendChat);
  $("#chat-stop").addEventListener("click", () => state.chat && state.chat.abort());
  $("#speak").addEventListener("click", speak);
  $("#transcribe").addEventListener("click", transcribe);
  if (state.token) signIn(state.token);
});

