// kvflow's page: the chat playground (POST /v1/chat/completions, streamed) and the dashboard (GET /stats,
// polled twice a second). Plain JS with no build step (see index.html). Safety rule for this file: text
// from the model, the user or the server only ever goes into the page through textContent (or canvas
// fillText); nothing here assigns innerHTML, so a reply holding <script> shows as text.
"use strict";

const $ = (id) => document.getElementById(id);
const store = {
  get(key, fallback) {
    try { const v = localStorage.getItem(key); return v === null ? fallback : JSON.parse(v); } catch { return fallback; }
  },
  set(key, value) { try { localStorage.setItem(key, JSON.stringify(value)); } catch { /* full or off */ } },
};

// ---- the API key and requests ------------------------------------------------------------------

let apiKey = sessionStorage.getItem("kvflow.key") || "";   // this tab only: a secret is not kept on disk
let model = null;

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, opts = {}) {
  const headers = { ...(opts.headers || {}) };
  const sentKey = apiKey;
  if (sentKey) headers.Authorization = "Bearer " + sentKey;
  const r = await fetch(path, { ...opts, headers });
  if (!r.ok) {
    let message = r.status + " " + r.statusText;
    try { const b = await r.json(); if (b && b.error && b.error.message) message = b.error.message; } catch { /* not JSON */ }
    if (r.status === 401 && sentKey === apiKey) {   // a refusal of a key since replaced asks nothing
      askKey(apiKey ? "The server refused this API key (401): " + message
                    : "This server asks for an API key (401): " + message);
    }
    throw new HttpError(r.status, message);
  }
  return r;
}

function askKey(message) {
  $("key-message").textContent = message;
  if ($("key-panel").hidden) {
    $("key-panel").hidden = false;
    $("key-input").focus();
  }
}

function showError(message) {
  const b = $("error-banner");
  b.textContent = message || "";
  b.hidden = !message;
}

let modelLoads = 0;

async function loadModel() {
  const load = ++modelLoads;       // only the newest call shows its result: an older one may answer last
  try {
    const models = await (await api("/v1/models")).json();
    if (load !== modelLoads) return;
    model = models.data && models.data.length ? models.data[0].id : null;
    $("model").textContent = model || "no model";
    showError("");
  } catch (e) {
    if (load !== modelLoads) return;
    $("model").textContent = "—";
    showError("Cannot list the models: " + e.message);
  }
}

// ---- tabs ----------------------------------------------------------------------------------------

function showTab(name) {
  const dash = name === "dashboard";
  $("chat").hidden = dash;
  $("dash").hidden = !dash;
  $("tab-chat").classList.toggle("active", !dash);
  $("tab-dash").classList.toggle("active", dash);
  if (location.hash !== "#" + name) history.replaceState(null, "", "#" + name);
  if (dash && lastStats) drawDashboard(lastStats);
}

// ---- the playground --------------------------------------------------------------------------------

const SETTINGS = ["system", "temperature", "top_p", "max_tokens", "seed"];
let conv = store.get("kvflow.chat", []);      // [{role, content, info, error}], kept in this browser
let controller = null;

function saveChat() { store.set("kvflow.chat", conv); }

function renderMessage(m) {
  const div = document.createElement("div");
  div.className = "msg " + (m.role === "user" ? "user" : "assistant") + (m.error ? " error" : "");
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = m.role;
  const body = document.createElement("div");
  body.className = "body";
  body.textContent = m.content;
  const info = document.createElement("div");
  info.className = "info";
  info.textContent = m.info || "";
  div.append(who, body, info);
  return div;
}

function renderChat() {
  const list = $("messages");
  list.replaceChildren(...conv.map(renderMessage));
  list.scrollTop = list.scrollHeight;
  updateButtons();
}

function updateButtons() {
  const busy = controller !== null;
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("regenerate").disabled = busy || !conv.some((m) => m.role === "user");
}

// server-sent events of a fetch response: the data of each event
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, i);
      buf = buf.slice(i + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data) yield data;
    }
  }
}

function number(id, parse) {
  const v = $(id).value.trim();
  if (v === "") return undefined;
  const n = parse(v);
  return Number.isFinite(n) ? n : undefined;
}

function chatRequest() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const m of conv) if (!m.error && m.content) messages.push({ role: m.role, content: m.content });
  const req = { model, messages, stream: true, stream_options: { include_usage: true } };
  for (const [key, parse] of [["temperature", parseFloat], ["top_p", parseFloat], ["max_tokens", (v) => parseInt(v, 10)],
                              ["seed", (v) => parseInt(v, 10)]]) {
    const v = number(key, parse);
    if (v !== undefined) req[key] = v;
  }
  return req;
}

// stream one assistant answer to the conversation as it stands
async function answer() {
  if (model === null) await loadModel();
  const req = chatRequest();
  const reply = { role: "assistant", content: "" };
  conv.push(reply);
  controller = new AbortController();
  renderChat();
  const el = $("messages").lastElementChild;
  const body = el.querySelector(".body"), info = el.querySelector(".info");
  el.classList.add("streaming");
  const t0 = performance.now();
  let tFirst = null, usage = null, finish = null, chunks = 0;
  try {
    const r = await api("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(req), signal: controller.signal,
    });
    for await (const data of sseData(r)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || "the stream failed");
      if (chunk.usage) usage = chunk.usage;
      for (const c of chunk.choices || []) {
        const text = c.delta && c.delta.content;
        if (text) {
          if (tFirst === null) tFirst = performance.now();
          chunks += 1;
          reply.content += text;
          body.textContent = reply.content;
          $("messages").scrollTop = $("messages").scrollHeight;
        }
        if (c.finish_reason) finish = c.finish_reason;
      }
    }
  } catch (e) {
    if (e.name === "AbortError") {
      finish = "stopped";
    } else {
      reply.error = true;
      reply.content += (reply.content ? "\n" : "") + "Error: " + e.message;
      body.textContent = reply.content;
      el.classList.add("error");
    }
  }
  const tEnd = performance.now();
  // the engine's own record of this request (GET /stats): its cached prompt tokens (a streamed usage
  // leaves them out) and its decode speed, free of the network's buffering. The engine's request id is
  // not the response's, so the record is the latest one that arrived after we sent, with this answer's
  // token counts: a best guess when identical requests run at once.
  let rec = null;
  if (usage && finish !== "stopped" && !reply.error) {
    try {
      const s = await (await api("/stats")).json();
      const sentAgo = (performance.now() - t0) / 1000 + 0.5;
      rec = (s.requests || []).filter((r) => r.arrival >= -sentAgo && r.prompt_tokens === usage.prompt_tokens
                                          && r.output_tokens === usage.completion_tokens).pop() || null;
    } catch { /* the answer stands without it */ }
  }
  const parts = [];
  if (tFirst !== null) {
    parts.push("TTFT " + Math.round(tFirst - t0) + " ms");
    const n = usage ? usage.completion_tokens : chunks;
    let tps = null;
    if (rec && rec.output_tokens > 1 && rec.finished > rec.first_token) {
      tps = (rec.output_tokens - 1) / (rec.finished - rec.first_token);
    } else if (n > 1 && tEnd > tFirst) {
      tps = (n - 1) / ((tEnd - tFirst) / 1000);
    }
    if (tps !== null) parts.push(tps.toFixed(1) + " tok/s");
    parts.push(n + " tokens");
  }
  if (usage) {
    const details = usage.prompt_tokens_details;
    const cached = details && details.cached_tokens ? details.cached_tokens : rec ? rec.cached_tokens : 0;
    parts.push(cached + " of " + usage.prompt_tokens + " prompt tokens cached");
  }
  if (finish) parts.push(finish);
  reply.info = parts.join(" · ");
  info.textContent = reply.info;
  el.classList.remove("streaming");
  controller = null;
  saveChat();
  updateButtons();
}

function send(event) {
  event.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || controller) return;
  $("prompt").value = "";
  conv.push({ role: "user", content: text });
  saveChat();
  answer();
}

function regenerate() {
  if (controller) return;
  while (conv.length && conv[conv.length - 1].role !== "user") conv.pop();
  if (conv.length) answer();
}

// ---- the dashboard ---------------------------------------------------------------------------------

const HISTORY_S = 300;
const hist = [];          // [{t, running, waiting, kv, hit, swap, disk}], t: performance.now() / 1000
let lastStats = null, prevSample = null, polling = false;

const pct = (x) => (100 * x).toFixed(1) + "%";

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.append(td);
}

function fillTable(tbody, rows) {
  tbody.replaceChildren(...rows.map((cells) => {
    const tr = document.createElement("tr");
    for (const c of cells) cell(tr, c);
    return tr;
  }));
}

const secs = (x) => (x === null || x === undefined ? "–" : x < 1 ? (1000 * x).toFixed(0) + " ms" : x.toFixed(2) + " s");

function updateStats(s) {
  const e = s.engine;
  const now = performance.now() / 1000;
  let swapRate = 0, diskRate = 0;
  if (prevSample && now > prevSample.t) {
    swapRate = Math.max(0, e.num_swapped_out - prevSample.swapped) / (now - prevSample.t);
    diskRate = Math.max(0, e.disk_hit_tokens - prevSample.disk) / (now - prevSample.t);
  }
  prevSample = { t: now, swapped: e.num_swapped_out, disk: e.disk_hit_tokens };
  hist.push({ t: now, running: e.num_running, waiting: e.num_waiting, kv: e.kv_cache_usage,
              hit: e.prefix_cache_hit_rate, swap: swapRate, disk: diskRate });
  while (hist.length && hist[0].t < now - HISTORY_S) hist.shift();

  $("model").textContent = s.model;
  $("health").textContent = s.health;
  $("health").className = "pill " + (s.health === "ok" ? "ok" : "bad");
  $("stat-running").textContent = e.num_running;
  $("stat-waiting").textContent = e.num_waiting;
  $("stat-kv").textContent = pct(e.kv_cache_usage);
  $("stat-hit").textContent = pct(e.prefix_cache_hit_rate);
  $("stat-prompt-tps").textContent = s.prompt_tokens_per_s.toFixed(1);
  $("stat-gen-tps").textContent = s.generation_tokens_per_s.toFixed(1);
  $("stat-finished").textContent = s.num_finished;
  $("stat-preempt").textContent = e.num_preemptions + " (" + e.num_swapped_out + ")";
  $("stat-swap").textContent = swapRate.toFixed(1) + " · " + diskRate.toFixed(0);
  $("stat-budget").textContent = e.token_budget;
  $("updated").textContent = "updated " + new Date().toLocaleTimeString() + " · kvflow " + s.version;

  const queues = Object.entries(e.queue_lengths || {});
  fillTable($("queues").tBodies[0], queues.length ? queues.map(([q, n]) => [q, String(n)])
                                                  : [["(this policy reports no queues)", ""]]);

  const replicas = s.replicas || [];
  $("replicas-box").hidden = replicas.length === 0;
  if (replicas.length) {
    const cols = [["index", "Replica", String], ["healthy", "Healthy", (v) => (v ? "yes" : "no")],
                  ...(replicas[0].role ? [["role", "Role", String]] : []),
                  ["num_assigned", "Routed here", String], ["num_running", "Running", String],
                  ["num_waiting", "Waiting", String], ["kv_cache_usage", "KV used", pct],
                  ["prefix_cache_hits", "Prefix hits", (v) => String(v)],
                  ["num_preemptions", "Preemptions", String], ["restarts", "Restarts", String]];
    const head = document.createElement("tr");
    for (const [, title] of cols) { const th = document.createElement("th"); th.textContent = title; head.append(th); }
    $("replicas").tHead.replaceChildren(head);
    fillTable($("replicas").tBodies[0], replicas.map((r) =>
      cols.map(([key, , f]) => (r[key] === undefined || r[key] === null ? "–" : f(r[key])))));
  }
  const router = s.router;
  $("router-box").hidden = !router;
  if (router) {
    $("router-summary").textContent = router.policy + ": " + router.decisions + " decisions, " +
      router.mean_us.toFixed(0) + " µs each; " + router.resumed + " resumed after a replica died, " +
      router.migrations + " migrated" + (router.disagg ? "; " + router.disagg.handoffs + " handed from prefill " +
      "to decode (" + router.disagg.kv_transfer + " KV transfer), " + router.disagg.rejected + " rejected early, " +
      router.disagg.fallbacks + " recomputed after a lost transfer" : "");
    fillTable($("router").tBodies[0], router.recent.slice().reverse().map((c) =>
      [c.request_id, "replica " + c.replica, (s.time - c.time).toFixed(1) + " s ago"]));
  }

  const reqs = (s.requests || []).slice(-15).reverse();
  fillTable($("requests").tBodies[0], reqs.map((r) => [
    r.id, (-r.finished).toFixed(1) + " s ago",
    secs(r.scheduled === null ? null : r.scheduled - r.arrival),
    secs(r.first_token === null ? null : r.first_token - r.arrival),
    secs(r.first_token === null ? null : r.finished - r.first_token),
    r.prompt_tokens + " (" + r.cached_tokens + ")", String(r.output_tokens), String(r.preemptions),
    r.finish_reason]));
  lastStats = s;
  if (!$("dash").hidden) drawDashboard(s);
}

function drawDashboard(s) {
  const now = performance.now() / 1000;
  const xs = (key, scale = 1) => hist.map((h) => [h.t - now, h[key] * scale]);
  // each chart spans the data it has (at least 30 s), up to 2 minutes (5 for the latencies)
  const span = (oldest, most) => -Math.min(most, Math.max(30, Math.ceil(-oldest / 15) * 15));
  const recent = span(Math.min(hist.length ? hist[0].t - now : 0, (s.tokens_per_s || [[0]])[0]?.[0] ?? 0), 120);
  Charts.line($("chart-load"), [{ label: "running", color: "#3b7ddd", points: xs("running") },
                                { label: "waiting", color: "#f0a030", points: xs("waiting") }], { xmin: recent });
  Charts.line($("chart-kv"), [{ label: "KV used", color: "#3b7ddd", points: xs("kv", 100) },
                              { label: "prefix hits", color: "#2f9e66", points: xs("hit", 100) }],
              { xmin: recent, ymax: 100, unit: "%" });
  const tps = s.tokens_per_s || [];
  Charts.line($("chart-tps"), [{ label: "prompt", color: "#f0a030", points: tps.map((p) => [p[0], p[1]]) },
                               { label: "generated", color: "#3b7ddd", points: tps.map((p) => [p[0], p[2]]) }],
              { xmin: recent });
  const lat = s.latency || [];
  const xmin = span(lat.length ? lat[0][0] : 0, s.window_s || 300);
  Charts.line($("chart-ttft"), [{ label: "TTFT", color: "#f0a030", dots: true, points: lat.map((p) => [p[0], p[1]]) }],
              { xmin });
  Charts.line($("chart-tpot"), [{ label: "TPOT", color: "#3b7ddd", dots: true,
                                  points: lat.filter((p) => p[2] !== null).map((p) => [p[0], 1000 * p[2]]) }], { xmin });
  Charts.line($("chart-swap"), [{ label: "swap-outs/s", color: "#d9363e", points: xs("swap") },
                                { label: "disk tokens/s", color: "#7b5cc4", points: xs("disk") }], { xmin: recent });
  Charts.timeline($("timeline"), (s.requests || []).slice(-40));
}

async function poll() {
  if (polling) return;
  polling = true;
  try {
    updateStats(await (await api("/stats")).json());
  } catch (e) {
    $("updated").textContent = "cannot read /stats: " + e.message;
    $("health").textContent = e.status === 401 ? "API key needed" : "unreachable";
    $("health").className = "pill bad";
  } finally {
    polling = false;
  }
}

// ---- start -----------------------------------------------------------------------------------------

function start() {
  $("tab-chat").addEventListener("click", () => showTab("playground"));
  $("tab-dash").addEventListener("click", () => showTab("dashboard"));
  $("key-button").addEventListener("click", () => askKey("API key (sent as Authorization: Bearer …)"));
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    apiKey = $("key-input").value.trim();
    if (apiKey) sessionStorage.setItem("kvflow.key", apiKey); else sessionStorage.removeItem("kvflow.key");
    $("key-input").value = "";
    $("key-panel").hidden = true;
    loadModel();
    poll();
  });
  const saved = store.get("kvflow.settings", {});
  for (const id of SETTINGS) {
    if (saved[id] !== undefined) $(id).value = saved[id];
    $(id).addEventListener("change", () => {
      const all = {};
      for (const k of SETTINGS) all[k] = $(k).value;
      store.set("kvflow.settings", all);
    });
  }
  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) send(event);
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("regenerate").addEventListener("click", regenerate);
  $("clear").addEventListener("click", () => { if (controller) controller.abort(); conv = []; saveChat(); renderChat(); });
  window.addEventListener("resize", () => lastStats && !$("dash").hidden && drawDashboard(lastStats));
  renderChat();
  showTab(location.hash === "#dashboard" ? "dashboard" : "playground");
  loadModel();
  poll();
  setInterval(poll, 500);         // twice a second: a slow answer (a busy server) still leaves one update a second
}

start();
