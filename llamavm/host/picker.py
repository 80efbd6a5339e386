"""The model picker page the control service serves at / (one self-contained HTML file).

It lists the catalog (GET /models) with each model's VRAM verdict, marks the one that serves,
switches with a click (POST /switch, server-sent progress shown as it comes), and shows GPU
memory, CPU/RAM and the load history (GET /status), with a link to the serving model's own chat
UI. With an API key policy, it asks for the key once and keeps it in this tab's sessionStorage.
Every value from the host is put on the page as text (textContent), never as HTML.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>llamavm — models</title>
<style>
  body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 62rem;
         padding: 0 1rem; color: #1d1d1f; }
  h1 { font-size: 1.4rem; margin-bottom: .2rem; }
  .muted { color: #666; }
  table { border-collapse: collapse; width: 100%; margin: 1rem 0; }
  th, td { text-align: left; padding: .45rem .6rem; border-bottom: 1px solid #ddd;
           vertical-align: top; }
  tr.active { background: #eef8ee; }
  .badge { display: inline-block; padding: 0 .4rem; border-radius: .3rem; font-size: .8rem;
           background: #2e7d32; color: #fff; }
  .badge.asleep { background: #5c6bc0; }
  .fits { color: #2e7d32; } .over { color: #b71c1c; } .unknown { color: #8d6e00; }
  button { font: inherit; padding: .25rem .8rem; cursor: pointer; }
  button:disabled { cursor: default; opacity: .5; }
  #progress { background: #111; color: #ddd; font: 13px/1.4 monospace; padding: .6rem;
              min-height: 3rem; max-height: 14rem; overflow: auto; white-space: pre-wrap; }
  #keybox { display: none; margin: 1rem 0; padding: .8rem; background: #fff4e5; }
  #error { color: #b71c1c; }
  .grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(14rem, 1fr));
          gap: .8rem; }
  .card { border: 1px solid #ddd; border-radius: .4rem; padding: .6rem .8rem; }
</style>
</head>
<body>
<h1>llamavm</h1>
<div class="muted">One model on the GPU at a time. <span id="serving">…</span>
  <a id="chat" href="#" hidden>Open its chat</a></div>
<div id="keybox">
  <label>API key <input id="key" type="password" autocomplete="off" size="40"></label>
  <button id="savekey">Use</button>
  <div class="muted">Kept in this tab only (sessionStorage).</div>
</div>
<p id="error" role="alert"></p>
<table>
  <thead><tr><th>model</th><th>fits the GPU?</th><th>last loads</th><th></th></tr></thead>
  <tbody id="models"></tbody>
</table>
<h2>Progress</h2>
<div id="progress" aria-live="polite"></div>
<h2>Host</h2>
<div class="grid" id="host"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let busy = false;

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = sessionStorage.getItem("llamavm-key");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

async function api(path, options) {
  const answer = await fetch(path, Object.assign({}, options || {},
    {headers: headers((options || {}).headers)}));
  if (answer.status === 401) {
    $("keybox").style.display = "block";
    throw new Error("this host wants its API key");
  }
  return answer;
}

function seconds(value) {
  return (typeof value === "number") ? value.toFixed(2) + " s" : "—";
}

function verdict(vram) {
  const v = (vram && vram.verdict) || "unknown";
  const cls = v === "fits" ? "fits" : (v === "over budget" ? "over" : "unknown");
  let text = v;
  if (vram && typeof vram.total_mib === "number") {
    text += " (" + Math.round(vram.total_mib) + " of " + Math.round(vram.available_mib) + " MiB)";
  }
  return el("span", text, cls);
}

function renderModels(data) {
  const body = $("models");
  body.replaceChildren();
  for (const m of data.models) {
    const row = el("tr", null, m.active ? "active" : "");
    row.dataset.model = m.name;
    const name = el("td");
    name.append(el("strong", m.name));
    if (m.active) { name.append(" "); name.append(el("span", "serving", "badge")); }
    if (m.asleep) { name.append(" "); name.append(el("span", "asleep", "badge asleep")); }
    if (m.idle_unload_s) {
      name.append(el("div", "sleeps after " + m.idle_unload_s + " s idle", "muted"));
    }
    if (m.aliases.length) name.append(el("div", "aliases: " + m.aliases.join(", "), "muted"));
    if (m.description) name.append(el("div", m.description, "muted"));
    if (m.reasoning) {
      name.append(el("div", "reasoning: " + m.reasoning.presets.join(" / ") +
        " (default " + m.reasoning.effort + ")", "muted"));
    }
    row.append(name);
    const fit = el("td"); fit.append(verdict(m.vram)); row.append(fit);
    row.append(el("td", "cold " + seconds((m.last_cold || {}).load_s) +
      ", warm " + seconds((m.last_warm || {}).load_s)));
    const action = el("td");
    const button = el("button", m.active ? "Serving" : "Switch");
    button.disabled = m.active || busy;
    button.dataset.switch = m.name;
    button.addEventListener("click", () => switchTo(m.name));
    action.append(button);
    row.append(action);
    body.append(row);
  }
  const active = data.models.find((m) => m.active);
  const asleep = data.models.find((m) => m.asleep);
  $("serving").textContent = active ? "Serving: " + active.name + "." :
    asleep ? asleep.name + " is asleep (idle); the next request wakes it." : "No model serves.";
  $("serving").dataset.active = active ? active.name : "";
  const chat = $("chat");
  if (active) {
    chat.href = location.protocol + "//" + location.hostname + ":" + active.port + "/";
    chat.hidden = false;
  } else {
    chat.hidden = true;
  }
}

function card(title, lines) {
  const box = el("div", null, "card");
  box.append(el("strong", title));
  for (const line of lines) box.append(el("div", line));
  return box;
}

function renderHost(status) {
  const host = $("host");
  host.replaceChildren();
  const gpus = status.gpus || [];
  if (gpus.length === 0) host.append(card("GPU", ["no GPU answered nvidia-smi"]));
  for (const g of gpus) {
    host.append(card("GPU " + g.index + " " + (g.name || ""), [
      "memory " + g.used_mib + " / " + g.total_mib + " MiB",
      "utilisation " + (g.utilization_pct ?? "—") + " %",
      "temperature " + (g.temperature_c ?? "—") + " °C, power " + (g.power_w ?? "—") + " W"]));
  }
  const sys = status.system || {};
  host.append(card("CPU / RAM", [
    (sys.cpus ?? "—") + " CPUs, load " + ((sys.load || []).join(" ") || "—"),
    "RAM available " + (sys.mem_available_mib ?? "—") + " of " +
      (sys.mem_total_mib ?? "—") + " MiB"]));
  const history = [];
  for (const m of status.models || []) {
    for (const load of (m.loads || []).slice(-3)) {
      history.push(m.name + ": " + seconds(typeof load === "number" ? load : load.seconds));
    }
  }
  host.append(card("Load history", history.length ? history : ["no loads yet"]));
}

async function refresh() {
  try {
    const models = await api("models");
    if (!models.ok) throw new Error((await models.json()).error || models.statusText);
    renderModels(await models.json());
    const status = await api("status");
    if (status.ok) renderHost(await status.json());
    $("error").textContent = "";
  } catch (err) {
    $("error").textContent = err.message;
  }
}

function log(line) {
  const box = $("progress");
  box.append(el("div", line));
  box.scrollTop = box.scrollHeight;
}

async function switchTo(name) {
  if (busy) return;
  busy = true;
  document.querySelectorAll("button[data-switch]").forEach((b) => { b.disabled = true; });
  $("progress").replaceChildren();
  log("switching to " + name + " …");
  try {
    const answer = await api("switch?stream=true", {
      method: "POST",
      headers: {"Content-Type": "application/json", "Accept": "text/event-stream"},
      body: JSON.stringify({model: name})});
    if (!answer.ok) throw new Error((await answer.json()).detail || answer.statusText);
    const reader = answer.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const kind = (block.match(/^event: (.*)$/m) || [])[1];
        const data = JSON.parse((block.match(/^data: (.*)$/m) || [])[1] || "{}");
        if (kind === "progress") log(data.message);
        if (kind === "outcome") {
          log(data.ok ? "done: " + (data.model || name) + " serves" : "failed: " + data.error);
          $("progress").dataset.outcome = data.ok ? "ok" : "failed";
        }
      }
    }
  } catch (err) {
    log("error: " + err.message);
    $("progress").dataset.outcome = "failed";
  } finally {
    busy = false;
    await refresh();
  }
}

$("savekey").addEventListener("click", () => {
  sessionStorage.setItem("llamavm-key", $("key").value.trim());
  $("key").value = "";
  $("keybox").style.display = "none";
  refresh();
});
refresh();
setInterval(() => { if (!busy) refresh(); }, 5000);
</script>
</body>
</html>
"""
