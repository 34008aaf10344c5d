// Edison's operator page: plain JavaScript, no build step, no network but Edison itself.
// It reads /system/memory and /models once, then follows /events (server-sent events,
// read with fetch so that the API key travels in a header, never in a URL).
"use strict";

const KEY = "edison-api-key";
const KEEP_FINISHED = 5; // finished jobs kept on the page
const state = {
  memory: null,
  tiers: new Map(),
  jobs: new Map(),
  finished: [],
  decisions: [],
  streaming: false,
  nodesPolled: false,
};

class NeedKey extends Error {}

function authHeaders() {
  const key = sessionStorage.getItem(KEY);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(method, path) {
  const r = await fetch(path, { method, headers: authHeaders() });
  if (r.status === 401) throw new NeedKey();
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((body.error && body.error.message) || r.statusText);
  return body;
}

// ---- small DOM helpers (text only: prompts and reasons are never parsed as HTML) ----
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}
const $ = (sel) => document.querySelector(sel);
const mb = (x) => (x === null || x === undefined ? "–" : `${Math.round(x).toLocaleString()} MB`);
const secs = (x) => (x === null || x === undefined ? "–" : x < 1 ? `${Math.round(x * 1000)} ms` : `${x.toFixed(1)} s`);
const clock = (t) => new Date(t * 1000).toLocaleTimeString();

// ---- memory -------------------------------------------------------------------------
function segments(m, dev) {
  const loaded = new Map(m.loaded_models.map((x) => [x.key, x]));
  const onGpu = dev.device !== "cpu";
  const out = [];
  for (const r of m.reservations.filter((x) => x.device === dev.device)) {
    const name = r.owner.replace(/^(model|pipeline|task):/, "");
    let label = `${name} ${mb(r.mb)}`;
    const lm = loaded.get(name);
    if (r.kind === "model" && lm) {
      const est = onGpu ? lm.vram_estimate_mb : lm.ram_estimate_mb;
      label = `${name} ${mb(r.mb)} (estimate ${mb(est)})`;
    }
    if (r.kind === "task") label = `task ${mb(r.mb)}: ${name}`;
    out.push({ kind: r.kind, mb: r.mb, label, name });
  }
  const others = Math.max(0, dev.capacity_mb - dev.driver_free_mb - dev.held_mb);
  out.push({ kind: "other", mb: others, label: `other programs ${mb(others)}`, name: "other" });
  const reserve = Math.min(dev.reserve_mb, dev.driver_free_mb);
  out.push({ kind: "reserve", mb: reserve, label: `reserve ${mb(reserve)}`, name: "reserve" });
  out.push({ kind: "usable", mb: dev.usable_mb, label: `usable ${mb(dev.usable_mb)}`, name: "usable" });
  return out;
}

// One stacked bar per device Edison places on, with that device's line and heavy slot.
function deviceBar(m, dev, lane, several) {
  const bar = el("div", { class: "bar", role: "img", "aria-label": `memory of ${dev.device}` });
  for (const s of segments(m, dev)) {
    const pct = dev.capacity_mb > 0 ? (100 * s.mb) / dev.capacity_mb : 0;
    bar.append(el("div", {
      class: `segment ${s.kind}`, title: s.label, style: `width:${pct.toFixed(3)}%`,
      dataset: { kind: s.kind, name: s.name, mb: s.mb.toFixed(1) },
    }, pct > 6 ? s.label : ""));
  }
  const list = el("ul", { class: "segments" },
    segments(m, dev).filter((s) => !["other", "reserve", "usable"].includes(s.kind))
      .map((s) => el("li", { dataset: { kind: s.kind, name: s.name } }, s.label)));
  if (!several || !lane) return [bar, list];
  const line = `${dev.device}: ${mb(dev.capacity_mb)} · line ${lane.state}` +
    (lane.current ? ` (${lane.current.reason})` : "") + `, ${lane.queue_length} waiting · heavy slot ` +
    (lane.heavy_slot || "empty");
  return [el("div", { class: "barlabel", dataset: { device: dev.device } }, line), bar, list];
}

function renderMemory() {
  const m = state.memory;
  const devices = m.devices && m.devices.length ? m.devices : [{ budget: m.device, lane: null }];
  const several = devices.length > 1;
  const dev = m.device;
  const what = dev.device === "cpu" ? "RAM (no GPU: everything runs on the CPU)" : `VRAM of ${dev.device}`;
  $("#device").textContent = several
    ? `VRAM of ${devices.length} devices: ${devices.map((d) => d.budget.device).join(", ")}`
    : `${what}, ${mb(dev.capacity_mb)}`;
  $("#source").textContent = `probe: ${m.vram_source}`;
  const placed = new Set(devices.map((d) => d.budget.device));
  const others = m.gpus.filter((g) => !placed.has(`cuda:${g.index}`)).map((g) =>
    el("div", { class: "barlabel" }, `GPU ${g.index} ${g.name}`, `${mb(g.used_mb)} used of ${mb(g.total_mb)}`));
  $("#bars").replaceChildren(
    ...devices.flatMap((d) => deviceBar(m, d.budget, d.lane, several)), ...others);
  $("#legend").replaceChildren(...["model", "pipeline", "task", "other", "reserve", "usable"].map((k) =>
    el("span", {}, el("i", { class: `segment ${k}` }), k)));
  const w = m.worker_overhead;
  $("#figures").textContent =
    `driver free ${mb(dev.driver_free_mb)} · Edison holds ${mb(dev.held_mb)} · usable ` +
    `${mb(dev.usable_mb)} = min(driver free, capacity − held) − reserve · an LLM worker ` +
    `costs ${mb(w.mb)} beyond its estimate here (${w.source}${w.samples ? `, ${w.samples} loads` : ""})`;
}

// ---- models -------------------------------------------------------------------------
function heavySlot() {
  for (const t of state.tiers.values()) if (t.heavy && t.status === "loaded" && !t.alias_of) return t.tier;
  return null;
}

function renderTiers() {
  $("#heavy-slot").textContent = heavySlot() || "empty";
  const rows = [...state.tiers.values()].map((t) => {
    const m = t.loaded;
    const onGpu = m && m.device !== "cpu";
    const measured = m ? (onGpu ? m.vram_measured_mb : m.rss_mb) : null;
    const est = m ? (onGpu ? m.vram_estimate_mb : m.ram_estimate_mb) : null;
    const attempts = t.attempts.slice(-3).map((a) => el("div", { class: a.ok ? "good" : "bad" },
      `rung ${a.rung} (layers ${a.n_gpu_layers}, ctx ${a.n_ctx}) ${a.ok ? "ready" : a.reason} · ${secs(a.ms / 1000)}`));
    const busy = t.status === "loading" || t.status === "unloading";
    const button = t.status === "loaded"
      ? el("button", { dataset: { action: "unload", tier: t.tier }, disabled: busy }, "Unload")
      : el("button", { dataset: { action: "load", tier: t.tier }, disabled: busy }, "Load");
    return el("tr", { dataset: { tier: t.tier } },
      el("td", {}, el("b", {}, t.tier), t.heavy ? el("div", { class: "muted" }, "heavy") : null),
      el("td", { class: `state ${t.status === "failed" ? "bad" : t.status === "loaded" ? "good" : ""}` },
        t.status, t.alias_of ? el("div", { class: "muted" }, `served by ${t.alias_of}`) : null,
        t.last_error ? el("div", { class: "bad" }, t.last_error) : null),
      el("td", {}, m ? `rung ${m.rung}: ${m.n_gpu_layers} GPU layers, ctx ${m.n_ctx}, on ${m.device}` : "–"),
      el("td", { class: "memory" }, m ? `${mb(measured)} / ${mb(est)}` : "–"),
      el("td", {}, attempts.length ? attempts : "–"),
      el("td", {}, button));
  });
  $("#tiers tbody").replaceChildren(...rows);
}

// ---- gate and jobs ------------------------------------------------------------------
function renderJobs() {
  const gate = state.memory.gate;
  $("#gate-state").textContent = gate.state;
  $("#gate-state").className = `pill ${gate.state === "busy" ? "busy" : ""}`;
  $("#gate-queue").textContent = `${gate.queue_length} waiting of at most ${gate.max_waiting}`;
  const active = [...state.jobs.values()].sort((a, b) => (a.position ?? 1e9) - (b.position ?? 1e9));
  const rows = [...active, ...state.finished].map((j) => {
    const p = j.params;
    const size = j.kind === "music" ? `${p.duration_s ?? ""} s` :
      `${p.width}x${p.height}${j.kind === "video" ? `, ${p.num_frames} frames` : p.num_images > 1 ? ` x${p.num_images}` : ""}`;
    const done = j.finished_at !== null;
    const place = done ? "–" : j.position === 0 ? "running" : `#${j.position}`;
    return el("tr", { dataset: { job: j.job_id, status: j.status } },
      el("td", { class: "place" }, place),
      el("td", {}, `${j.kind} ${size}`, el("div", { class: "muted" }, p.prompt.slice(0, 60))),
      el("td", { class: `status ${j.status === "failed" ? "bad" : j.status === "succeeded" ? "good" : ""}` },
        j.status, j.error ? el("div", { class: "muted" }, j.error.message) : null),
      el("td", {}, el("progress", { max: j.progress.total || 1, value: j.progress.done }),
        ` ${j.progress.done}/${j.progress.total}`),
      el("td", { class: "eta" }, done ? secs((j.timings_ms.total || 0) / 1000) : j.eta_s === null ? "–" : `~${secs(j.eta_s)}`),
      el("td", { title: j.gate ? j.gate.rung_because || null : null },
        j.gate ? `${mb(j.gate.required_mb)} (${j.gate.need_source})${j.gate.rung ? ` · ${j.gate.rung}` : ""}` : "–"),
      el("td", {}, done ? null : el("button", { dataset: { action: "cancel", job: j.job_id } }, "Cancel")));
  });
  $("#jobs tbody").replaceChildren(...rows);
  $("#no-jobs").hidden = rows.length > 0;
}

function renderDecisions() {
  const rows = state.decisions.slice(0, 10).map((d) => el("tr", {},
    el("td", {}, clock(d.at)), el("td", {}, d.reason),
    el("td", { class: d.ok ? "good" : "bad" }, d.ok ? "yes" : "no"),
    el("td", { title: d.rung_because || null },
      `${mb(d.required_mb)} (${d.need_source}${d.need_detail ? `: ${d.need_detail}` : ""})`,
      d.rung ? el("div", { class: "muted" }, `rung ${d.rung}`) : null),
    el("td", {}, mb(d.usable_mb)), el("td", {}, d.actions.join("; ")),
    el("td", {}, mb(d.freed_mb)), el("td", {}, secs(d.waited_ms / 1000))));
  $("#decisions tbody").replaceChildren(...rows);
}

function renderPipelines() {
  const rows = state.memory.pipelines.map((p) => {
    const m = p.memory_model;
    const learned = !m ? "–" : m.learned
      ? `(${m.a_mb.toFixed(1)} + ${m.b_mb_per_unit.toExponential(2)} × size) × ${m.margin.toFixed(2)} · ${m.samples} runs`
      : `the configured prior: ${m.samples} run${m.samples === 1 ? "" : "s"} measured so far`;
    return el("tr", { dataset: { kind: p.kind } },
      el("td", {}, el("b", {}, p.kind)),
      el("td", {}, p.running ? "running" : p.loaded ? "loaded" : "unloaded",
        p.load_error ? el("div", { class: "bad" }, p.load_error) : null),
      el("td", {}, `${p.device}${p.dtype ? ` / ${p.dtype}` : ""}`,
        p.placement ? el("div", { class: "muted" }, p.placement_detail || p.placement) : null),
      el("td", {}, p.loaded ? `${mb(p.weights_mb)} weights + ${mb(p.persisted_mb)}` : "–",
        p.offloaded_mb ? el("div", { class: "muted" }, `${mb(p.offloaded_mb)} offloaded to RAM`) : null),
      el("td", {}, learned),
      el("td", {}, m && m.last_measured_mb !== null ? `${mb(m.last_predicted_mb)} / ${mb(m.last_measured_mb)}` : "–"));
  });
  $("#pipelines tbody").replaceChildren(...rows);
  $("#no-pipelines").hidden = rows.length > 0;
}

// ---- cluster nodes (cluster mode only: /system/cluster is 404 on one host) -----------
const CLUSTER_EVERY_MS = 2000;

function renderNodes(c) {
  $("#nodes-section").hidden = false;
  const db = $("#cluster-db");
  db.textContent = c.database_ok ? "database ok" : "database unreachable";
  db.className = `pill ${c.database_ok ? "on" : "off"}`;
  $("#cluster-this").textContent = `this page is served by ${c.this_node}`;
  const rows = c.nodes.map((n) => el("tr", { dataset: { node: n.name, alive: n.alive ? "yes" : "no" } },
    el("td", {}, el("b", {}, n.name), n.name === c.this_node ? el("span", { class: "muted" }, " (this node)") : null,
      el("div", { class: "muted" }, n.public_url)),
    el("td", { class: `heartbeat ${n.alive ? "good" : "bad"}` },
      `${n.alive ? "alive" : "silent"} · ${n.heartbeat_age_s === null ? "never" : `${secs(n.heartbeat_age_s)} ago`}`),
    el("td", { class: "devices" }, n.devices.length
      ? n.devices.map((d) => el("div", {}, `${d.device}: ${mb(d.usable_mb)} of ${mb(d.capacity_mb)}`)) : "–"),
    el("td", { class: "tiers" }, n.tiers_loaded.join(", ") || "–"),
    el("td", { class: "kinds" }, n.kinds.join(", ") || "–"),
    el("td", { class: "running" }, String(n.running_jobs))));
  $("#nodes tbody").replaceChildren(...rows);
  const queues = c.queues.map((q) => el("tr", { dataset: { queue: q.queue } },
    el("td", {}, q.queue), el("td", { class: "queued" }, String(q.queued)),
    el("td", { class: "running" }, String(q.running)), el("td", { class: "attempts" }, String(q.attempts))));
  $("#queues tbody").replaceChildren(...queues);
  $("#no-queues").hidden = queues.length > 0;
}

function followCluster() {
  if (state.nodesPolled) return; // start() runs again after a key or an error: one poll
  state.nodesPolled = true;
  pollCluster();
}

async function pollCluster() {
  try {
    const r = await fetch("/system/cluster", { headers: authHeaders() });
    // One host: no cluster, no panel, no polling. A refused key: the key form takes over.
    if (r.status === 404 || r.status === 401) { state.nodesPolled = r.status === 404; return; }
    if (r.ok) renderNodes(await r.json());
    else logEvent("error", `nodes: ${r.status}`);
  } catch (e) {
    logEvent("error", `nodes: ${e.message}`);
  }
  setTimeout(pollCluster, CLUSTER_EVERY_MS);
}

function renderAll() {
  renderMemory(); renderTiers(); renderJobs(); renderDecisions(); renderPipelines();
}

// ---- events -------------------------------------------------------------------------
function logEvent(type, text) {
  const item = el("li", {}, el("b", {}, type), ` ${text}`);
  $("#log").prepend(item);
  while ($("#log").children.length > 40) $("#log").lastChild.remove();
}

function keepJob(j) {
  if (j.finished_at !== null) {
    state.jobs.delete(j.job_id);
    state.finished = [j, ...state.finished.filter((x) => x.job_id !== j.job_id)].slice(0, KEEP_FINISHED);
  } else {
    state.jobs.set(j.job_id, j);
  }
}

function handle(type, ev) {
  const d = ev.data;
  if (type === "memory.snapshot") {
    state.memory = d;
    for (const id of [...state.jobs.keys()]) if (!d.jobs.some((j) => j.job_id === id)) state.jobs.delete(id);
    d.jobs.forEach(keepJob);
    renderMemory(); renderJobs(); renderPipelines();
    return;
  }
  if (type.startsWith("model.")) {
    state.tiers.set(d.tier, d);
    renderTiers();
    logEvent(type, `${d.tier}${d.last_error ? `: ${d.last_error}` : ""}`);
  } else if (type === "gate.decision") {
    state.decisions.unshift(d);
    renderDecisions();
    logEvent(type, `${d.ok ? "ok" : "refused"} ${d.reason}: ${d.actions.join("; ")}`);
  } else if (type.startsWith("job.")) {
    keepJob(d);
    renderJobs();
    if (type !== "job.progress") logEvent(type, `${d.kind} ${d.status}`);
  }
}

async function follow() {
  if (state.streaming) return;
  state.streaming = true;
  const live = $("#live");
  try {
    const r = await fetch("/events", { headers: authHeaders() });
    if (r.status === 401) throw new NeedKey();
    if (!r.ok || !r.body) throw new Error(`events: ${r.status}`);
    live.textContent = "live"; live.className = "pill on";
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let type = "message", data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) type = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        if (!data) continue;
        if (type === "dropped") { await load(); continue; } // fell behind: read everything again
        handle(type, JSON.parse(data));
      }
    }
  } catch (e) {
    if (e instanceof NeedKey) { askForKey("The key was refused."); return; }
  } finally {
    state.streaming = false;
  }
  live.textContent = "reconnecting"; live.className = "pill off";
  setTimeout(() => load().then(follow, () => setTimeout(follow, 2000)), 2000);
}

// ---- start, key, buttons ------------------------------------------------------------
async function load() {
  const [memory, models] = await Promise.all([api("GET", "/system/memory"), api("GET", "/models")]);
  state.memory = memory;
  state.tiers = new Map(models.tiers.map((t) => [t.tier, t]));
  state.jobs = new Map();
  memory.jobs.forEach(keepJob);
  state.decisions = [...memory.gate.last_decisions].reverse();
  $("#keyform").hidden = true;
  $("#main").hidden = false;
  renderAll();
}

function askForKey(why) {
  $("#main").hidden = true;
  $("#keyform").hidden = false;
  $("#keyerror").textContent = why || "";
  $("#key").focus();
}

async function start() {
  try {
    await load();
    follow();
    followCluster();
  } catch (e) {
    if (e instanceof NeedKey) askForKey(sessionStorage.getItem(KEY) ? "The key was refused." : "");
    else { $("#live").textContent = `error: ${e.message}`; setTimeout(start, 3000); }
  }
}

$("#keyform form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(KEY, $("#key").value.trim());
  start();
});

document.addEventListener("click", async (ev) => {
  const b = ev.target.closest("button[data-action]");
  if (!b) return;
  const { action, tier, job } = b.dataset;
  const call = {
    load: ["POST", `/models/${tier}/load`],
    unload: ["POST", `/models/${tier}/unload`],
    "unload-all": ["POST", "/models/unload-all"],
    cancel: ["POST", `/jobs/${job}/cancel`],
  }[action];
  b.disabled = true;
  try {
    await api(...call);
    if (action !== "cancel") {
      const models = await api("GET", "/models");
      state.tiers = new Map(models.tiers.map((t) => [t.tier, t]));
      renderTiers();
    }
  } catch (e) {
    if (e instanceof NeedKey) askForKey("The key was refused.");
    else logEvent("error", `${action}: ${e.message}`);
  } finally {
    b.disabled = false;
  }
});

start();
