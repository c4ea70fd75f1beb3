// keel's operator page: plain DOM, no dependencies. It signs in at /ui/session (an HttpOnly
// session cookie plus a CSRF token kept in memory here), then polls the operator API every
// POLL_MS and redraws what changed. Text from the server is only ever set as textContent.
"use strict";

const POLL_MS = 3000;
const CSRF_HEADER = "X-CSRF-Token";
const STATUSES = ["pending", "executing", "completed", "failed", "cancelled", "dead"];
const FINISHED = ["completed", "failed", "cancelled", "dead"];

const state = {
  csrf: null,
  timer: null,
  last: {},            // section -> JSON last drawn, so unchanged sections are not redrawn
  selectedDead: new Set(),
  openPanics: new Set(),
  org: null,
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function ago(iso) {
  if (!iso) return "never";
  const seconds = Math.round((Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 0) return "in " + span(-seconds);
  return span(seconds) + " ago";
}

function span(seconds) {
  if (seconds < 90) return seconds + " s";
  if (seconds < 5400) return Math.round(seconds / 60) + " min";
  if (seconds < 172800) return Math.round(seconds / 3600) + " h";
  return Math.round(seconds / 86400) + " d";
}

function time(iso) {
  return el("time", { datetime: iso || "", title: iso || "" }, ago(iso));
}

function notice(message, bad) {
  const box = $("notice");
  box.textContent = message;
  box.className = bad ? "notice bad" : "notice";
}

// --- requests ---

class ApiFailure extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || ("HTTP " + status));
    this.status = status;
    this.body = body;
  }
}

async function api(method, path, body) {
  const headers = { "Accept": "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && state.csrf) headers[CSRF_HEADER] = state.csrf;
  const response = await fetch(path, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let parsed = null;
  try { parsed = text ? JSON.parse(text) : null; } catch (_) { parsed = null; }
  if (response.status === 401 && path !== "/ui/session") {
    signedOut("Your session ended: sign in again.");
  }
  if (!response.ok) throw new ApiFailure(response.status, parsed);
  return parsed;
}

// --- sign-in ---

function signedIn(session) {
  state.csrf = session.csrf_token;
  $("operator").textContent = "Signed in as " + session.operator;
  $("sign-in").hidden = true;
  $("main").hidden = false;
  $("who").hidden = false;
  state.last = {};
  refresh();
  loadFilters();
  loadOrganisations();
  clearInterval(state.timer);
  state.timer = setInterval(refresh, POLL_MS);
}

function signedOut(message) {
  state.csrf = null;
  clearInterval(state.timer);
  state.timer = null;
  $("main").hidden = true;
  $("who").hidden = true;
  $("sign-in").hidden = false;
  $("sign-in-error").textContent = message || "";
  $("key").value = "";
  $("key").focus();
}

async function signIn(event) {
  event.preventDefault();
  const error = $("sign-in-error");
  error.textContent = "";
  try {
    const session = await api("POST", "/ui/session", { key: $("key").value });
    $("key").value = "";
    signedIn(session);
  } catch (failure) {
    if (failure.status === 401) error.textContent = "That key was not accepted: it is not a current operator key.";
    else if (failure.status === 429) error.textContent = "Too many sign-in attempts: wait a minute and try again.";
    else error.textContent = "Sign-in failed: " + failure.message;
    $("key").select();
  }
}

async function signOut() {
  try { await api("DELETE", "/ui/session"); } catch (_) { /* the session is gone either way */ }
  signedOut("Signed out.");
}

// --- polling ---

async function refresh() {
  const started = new Date();
  const get = (path) => api("GET", path).catch((failure) => ({ failed: failure }));
  const [ready, components, panics, summary, agents, fleet, dead, jobs] = await Promise.all([
    fetch("/readyz").then((r) => r.json()).catch(() => null),
    get("/v1/admin/components"),
    get("/v1/admin/panics"),
    get("/v1/admin/commands/summary"),
    get("/v1/admin/agents"),
    get("/v1/admin/fleet"),
    get("/v1/admin/dead-commands"),
    get("/v1/admin/jobs"),
  ]);
  if (!state.csrf) return;
  drawHealth(ready);
  draw("components", components, drawComponents);
  draw("panics", panics, drawPanics);
  draw("summary", summary, drawSummary);
  draw("agents", agents, drawAgents);
  draw("fleet", fleet, drawFleet);
  draw("dead", dead, drawDead);
  // An interval being edited is not overwritten: the table waits until focus leaves it.
  if (!$("jobs").contains(document.activeElement)) draw("jobs", jobs, drawJobs);
  const failed = [components, panics, summary, agents, fleet, dead, jobs].filter((data) => data && data.failed);
  $("updated").textContent = "Updated " + started.toLocaleTimeString() + " (every " + POLL_MS / 1000 + " s)" +
    (failed.length ? "; " + failed.length + " section" + (failed.length === 1 ? "" : "s") + " could not be read: " + failed[0].failed.message : "");
}

// Redraws a section when its data changed, keeping the focused control focused.
function draw(name, data, drawer) {
  if (data && data.failed) return;
  const json = JSON.stringify(data);
  if (state.last[name] === json) return;
  state.last[name] = json;
  const focused = document.activeElement && document.activeElement.dataset
    ? document.activeElement.dataset.focus : undefined;
  drawer(data);
  if (focused) {
    const again = document.querySelector('[data-focus="' + CSS.escape(focused) + '"]');
    if (again) again.focus();
  }
}

function drawHealth(ready) {
  const badge = $("health");
  if (!ready) { badge.textContent = "unreachable"; badge.className = "badge degraded"; return; }
  if (ready.status === "ready") { badge.textContent = "ready"; badge.className = "badge ready"; return; }
  badge.textContent = "degraded: " + (ready.degraded || []).join(", ");
  badge.className = "badge degraded";
}

function drawComponents(components) {
  const body = $("components").tBodies[0];
  body.replaceChildren(...components.map((c) => el("tr", {},
    el("td", {}, c.name, el("span", { class: "muted" }, " " + c.kind)),
    el("td", {}, el("span", { class: "state " + c.state }, c.state)),
    el("td", { class: "num" }, c.restarts),
    el("td", {}, c.last_tick ? time(c.last_tick) : "—"),
    el("td", {}, c.last_panic ? (c.last_panic.message || "yes") : "—"),
  )));
}

function drawPanics(panics) {
  const total = panics.groups.reduce((sum, g) => sum + g.count, 0);
  $("panics-total").textContent = total === 0
    ? "No panics since keel started."
    : total + " panic" + (total === 1 ? "" : "s") + " since keel started, " + panics.groups.length + " fingerprint" + (panics.groups.length === 1 ? "" : "s") + ".";
  const minutes = perMinute(panics.recent.map((p) => p.at));
  $("panics-chart").replaceChildren(barChart(minutes.map((n) => ({ total: n })), ["total"], { total: "var(--bad)" }, "Panics per minute over the last hour"));
  const list = $("panic-groups");
  list.replaceChildren(...panics.groups.map((group) => {
    const latest = panics.recent.find((p) => p.fingerprint === group.fingerprint);
    const details = el("details", { "data-fingerprint": group.fingerprint, open: state.openPanics.has(group.fingerprint) },
      el("summary", { "data-focus": "panic-" + group.fingerprint },
        el("span", { class: "count" }, "×" + group.count),
        group.last_message.length > 120 ? group.last_message.slice(0, 120) + "…" : group.last_message,
        el("span", { class: "muted" }, " — " + group.component + ", last " + ago(group.last_seen))),
      el("dl", {},
        el("dt", {}, "Message"), el("dd", {}, group.last_message),
        el("dt", {}, "Location"), el("dd", {}, group.location || "unknown"),
        el("dt", {}, "Component"), el("dd", {}, group.component),
        el("dt", {}, "First seen"), el("dd", {}, time(group.first_seen)),
        el("dt", {}, "Last seen"), el("dd", {}, time(group.last_seen)),
        el("dt", {}, "Request ids"), el("dd", {}, (group.recent_request_ids || []).join(", ") || "none"),
        el("dt", {}, "Fingerprint"), el("dd", {}, el("code", {}, group.fingerprint))),
      latest && latest.backtrace ? el("pre", { "aria-label": "Backtrace" }, latest.backtrace) : el("p", { class: "muted" }, "No backtrace kept for the latest one."));
    details.addEventListener("toggle", () => {
      if (details.open) state.openPanics.add(group.fingerprint); else state.openPanics.delete(group.fingerprint);
    });
    return details;
  }));
}

// Counts of timestamps per minute over the last hour, oldest first.
function perMinute(stamps) {
  const now = Date.now();
  const counts = new Array(60).fill(0);
  for (const stamp of stamps) {
    const minutesAgo = Math.floor((now - Date.parse(stamp)) / 60000);
    if (minutesAgo >= 0 && minutesAgo < 60) counts[59 - minutesAgo] += 1;
  }
  return counts;
}

// A stacked bar chart as inline SVG: one bar per entry of `rows`, stacked by `keys`.
function barChart(rows, keys, colours, label) {
  const ns = "http://www.w3.org/2000/svg";
  const width = 600, height = 120, pad = 14;
  const max = Math.max(1, ...rows.map((row) => keys.reduce((sum, k) => sum + (row[k] || 0), 0)));
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 " + width + " " + height);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", label + ", highest " + max);
  const bar = (width - 2) / rows.length;
  rows.forEach((row, i) => {
    let y = height - pad;
    for (const key of keys) {
      const value = row[key] || 0;
      if (!value) continue;
      const h = (value / max) * (height - 2 * pad);
      const rect = document.createElementNS(ns, "rect");
      rect.setAttribute("x", String(1 + i * bar + 0.5));
      rect.setAttribute("y", String(y - h));
      rect.setAttribute("width", String(Math.max(1, bar - 1)));
      rect.setAttribute("height", String(h));
      rect.setAttribute("fill", colours[key]);
      const title = document.createElementNS(ns, "title");
      title.textContent = (row.label ? row.label + ": " : "") + value + " " + key;
      rect.append(title);
      svg.append(rect);
      y -= h;
    }
  });
  // The scale as text beside the chart: text inside a stretched SVG would be stretched too.
  const scale = el("span", { class: "scale muted" }, "top of the scale: " + max + " a minute");
  const wrap = el("div", {}, scale);
  wrap.prepend(svg);
  return wrap;
}

function drawSummary(summary) {
  $("status-counts").replaceChildren(...STATUSES.map((status) =>
    el("li", {}, el("b", {}, summary.by_status[status]), el("span", { class: "state " + status }, status))));
  const rows = summary.finished_per_minute.map((m) => ({ ...m, label: new Date(m.minute).toLocaleTimeString() }));
  const colours = { completed: "var(--completed)", failed: "var(--failed)", cancelled: "var(--cancelled)", dead: "var(--dead)" };
  $("rates-chart").replaceChildren(barChart(rows, FINISHED, colours, "Commands finished per minute over the last hour"));
  $("org-counts").tBodies[0].replaceChildren(...summary.organisations.map((org) => el("tr", {},
    el("td", {}, org.org),
    ...STATUSES.map((status) => el("td", { class: "num" }, org.by_status[status])))));
}

function drawFleet(overview) {
  $("paused-summary").textContent = overview.paused_queues.length
    ? overview.paused_queues.length + " paused queue" + (overview.paused_queues.length === 1 ? "" : "s") + "."
    : "No queue is paused.";
  $("paused-queues").tBodies[0].replaceChildren(...overview.paused_queues.map((paused) => el("tr", {},
    el("td", {}, paused.org),
    el("td", {}, paused.queue),
    el("td", {}, time(paused.paused_at)))));
  $("schedules").tBodies[0].replaceChildren(...overview.schedules.map((schedule) => el("tr", {},
    el("td", {}, schedule.org),
    el("td", {}, schedule.name || schedule.id),
    el("td", {}, schedule.cron + " (" + schedule.timezone + ")"),
    el("td", {}, el("span", { class: "state " + (schedule.state === "active" ? "active" : "stopped") }, schedule.state)),
    el("td", {}, time(schedule.next_fires[0])),
    el("td", {}, time(schedule.last_fire_at)))));
}

function drawAgents(overview) {
  $("agents-summary").textContent = overview.online + " online, " + overview.offline + " offline.";
  $("agents").tBodies[0].replaceChildren(...overview.agents.map((agent) => el("tr", {},
    el("td", {}, agent.org),
    el("td", {}, agent.name),
    el("td", {},
      el("span", { class: "state " + (agent.online ? "online" : "offline") }, agent.online ? "online" : "offline"),
      agent.cordoned ? el("span", { class: "state cordoned" }, " cordoned") : ""),
    el("td", {}, (agent.queues || []).join(", ") || "—"),
    el("td", {}, Object.entries(agent.labels || {}).map(([k, v]) => k + "=" + v).join(", ") || "—"),
    el("td", {}, time(agent.last_seen_at)))));
}

function deadKey(item) { return item.org + "/" + item.id; }

function drawDead(dead) {
  const keys = new Set(dead.items.map(deadKey));
  for (const key of [...state.selectedDead]) if (!keys.has(key)) state.selectedDead.delete(key);
  $("dead").tBodies[0].replaceChildren(...dead.items.map((item) => {
    const key = deadKey(item);
    const box = el("input", {
      type: "checkbox", "data-focus": "select-" + key, "aria-label": "Select " + item.id,
      checked: state.selectedDead.has(key),
      onchange: (e) => { if (e.target.checked) state.selectedDead.add(key); else state.selectedDead.delete(key); },
    });
    return el("tr", { "data-command": item.id },
      el("td", {}, box),
      el("td", {}, item.org),
      el("td", {}, el("code", {}, item.id)),
      el("td", {}, item.type),
      el("td", {}, item.dead_reason || item.status),
      el("td", { class: "num" }, item.attempts),
      el("td", {}, time(item.finished_at)),
      el("td", {}, el("button", {
        type: "button", class: "secondary", "data-focus": "requeue-" + key,
        "aria-label": "Requeue " + item.id,
        onclick: () => requeue([{ org: item.org, id: item.id }]),
      }, "Requeue")));
  }));
  $("dead-empty").hidden = dead.items.length > 0;
  $("dead-truncated").hidden = !dead.truncated;
  $("requeue-selected").disabled = dead.items.length === 0;
}

async function requeue(commands) {
  if (commands.length === 0) { notice("Select dead commands first.", true); return; }
  try {
    const result = await api("POST", "/v1/admin/dead-commands/requeue", { commands });
    for (const item of result.requeued) state.selectedDead.delete(deadKey(item));
    const refused = result.not_requeued.map((r) => r.id + ": " + r.message);
    notice("Requeued " + result.requeued.length + " command" + (result.requeued.length === 1 ? "" : "s") +
      (refused.length ? "; not requeued: " + refused.join("; ") : "") + ".", refused.length > 0);
    refresh();
  } catch (failure) {
    notice("Requeue failed: " + failure.message, true);
  }
}

function requeueSelected(event) {
  event.preventDefault();
  requeue([...state.selectedDead].map((key) => {
    const at = key.indexOf("/");
    return { org: key.slice(0, at), id: key.slice(at + 1) };
  }));
}

// --- filters and jobs ---

async function loadFilters() {
  try {
    const filters = await api("GET", "/v1/admin/log-filters");
    $("filters").value = JSON.stringify(filters, null, 2);
  } catch (failure) {
    notice("Could not read the log filters: " + failure.message, true);
  }
}

async function saveFilters(event) {
  event.preventDefault();
  let body;
  try { body = JSON.parse($("filters").value); } catch (error) {
    notice("The log filters are not valid JSON: " + error.message, true);
    return;
  }
  try {
    const saved = await api("PUT", "/v1/admin/log-filters", body);
    $("filters").value = JSON.stringify(saved, null, 2);
    notice("Log filters saved.");
  } catch (failure) {
    notice("Log filters not saved: " + failure.message, true);
  }
}

function interval(ms) {
  if (ms % 3600000 === 0) return ms / 3600000 + "h";
  if (ms % 60000 === 0) return ms / 60000 + "m";
  if (ms % 1000 === 0) return ms / 1000 + "s";
  return ms + "ms";
}

function drawJobs(jobs) {
  $("jobs").tBodies[0].replaceChildren(...jobs.map((job) => {
    const id = "interval-" + job.name;
    const input = el("input", { id, value: interval(job.interval_ms), "data-focus": id, required: true });
    const save = el("button", { type: "submit", class: "secondary", "data-focus": "save-" + job.name }, "Save");
    const form = el("form", {
      class: "job-interval",
      onsubmit: async (event) => {
        event.preventDefault();
        try {
          await api("PUT", "/v1/admin/jobs/" + encodeURIComponent(job.name) + "/interval", { interval: input.value.trim() });
          notice("The interval of " + job.name + " is now " + input.value.trim() + ".");
          delete state.last.jobs;
          refresh();
        } catch (failure) {
          notice("Interval not changed: " + failure.message, true);
        }
      },
    }, el("label", { for: id, class: "visually-hidden" }, "Interval of " + job.name), input, save);
    return el("tr", {},
      el("td", {}, job.name),
      el("td", {}, el("span", { class: "state " + job.state }, job.state)),
      el("td", { class: "num" }, job.runs + " (" + job.runs_last_hour + ")"),
      el("td", { class: "num" }, job.failures),
      el("td", { class: "num" }, job.avg_ms.toFixed(1) + " ms"),
      el("td", {}, form));
  }));
}

// --- organisations and keys ---

async function loadOrganisations() {
  try {
    const orgs = await api("GET", "/v1/admin/organisations");
    const select = $("org-select");
    const keep = state.org && orgs.some((o) => o.name === state.org) ? state.org : (orgs[0] && orgs[0].name);
    select.replaceChildren(...orgs.map((o) => el("option", { value: o.name, selected: o.name === keep }, o.name)));
    state.org = keep || null;
    await loadKeys();
  } catch (failure) {
    notice("Could not list organisations: " + failure.message, true);
  }
}

async function loadKeys() {
  const body = $("keys").tBodies[0];
  if (!state.org) { body.replaceChildren(); return; }
  const org = state.org;
  const keys = await api("GET", "/v1/admin/organisations/" + encodeURIComponent(org) + "/keys");
  body.replaceChildren(...keys.map((key) => el("tr", { "data-key": key.id },
    el("td", {}, key.name),
    el("td", {}, el("code", {}, key.prefix)),
    el("td", {}, key.scopes.join(", ")),
    el("td", {}, time(key.created_at)),
    el("td", {}, el("span", { class: "state " + (key.revoked_at ? "revoked" : "active") }, key.revoked_at ? "revoked" : "active")),
    el("td", {}, key.revoked_at ? "" : el("button", {
      type: "button", class: "danger", "aria-label": "Revoke key " + key.name,
      onclick: () => revokeKey(org, key),
    }, "Revoke")))));
}

async function createOrganisation(event) {
  event.preventDefault();
  const name = $("org-name").value.trim();
  try {
    await api("POST", "/v1/admin/organisations", { name });
    $("org-name").value = "";
    state.org = name;
    await loadOrganisations();
    notice("Organisation " + name + " created.");
  } catch (failure) {
    notice("Organisation not created: " + failure.message, true);
  }
}

async function createKey(event) {
  event.preventDefault();
  if (!state.org) { notice("Create an organisation first.", true); return; }
  const scopes = [...document.querySelectorAll('input[name="scope"]:checked')].map((box) => box.value);
  const body = { name: $("key-name").value.trim(), scopes };
  const agent = $("key-agent").value.trim();
  if (agent) body.agent = agent;
  try {
    const created = await api("POST", "/v1/admin/organisations/" + encodeURIComponent(state.org) + "/keys", body);
    $("key-name").value = "";
    $("token-value").textContent = created.token;
    $("new-token").hidden = false;
    $("token-dismiss").focus();
    await loadKeys();
    notice("Key " + created.name + " created for " + state.org + ".");
  } catch (failure) {
    notice("Key not created: " + failure.message, true);
  }
}

async function revokeKey(org, key) {
  if (!window.confirm("Revoke the key " + key.name + " (" + key.prefix + ") of " + org + "? It stops working at once.")) return;
  try {
    await api("POST", "/v1/admin/organisations/" + encodeURIComponent(org) + "/keys/" + encodeURIComponent(key.id) + "/revoke", {});
    notice("Key " + key.name + " revoked.");
    await loadKeys();
  } catch (failure) {
    notice("Key not revoked: " + failure.message, true);
  }
}

function dismissToken() {
  $("token-value").textContent = "";
  $("new-token").hidden = true;
  $("key-name").focus();
}

// --- start ---

document.addEventListener("DOMContentLoaded", async () => {
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  $("dead-form").addEventListener("submit", requeueSelected);
  $("filters-form").addEventListener("submit", saveFilters);
  $("filters-reload").addEventListener("click", loadFilters);
  $("org-form").addEventListener("submit", createOrganisation);
  $("key-form").addEventListener("submit", createKey);
  $("token-dismiss").addEventListener("click", dismissToken);
  $("org-select").addEventListener("change", (event) => { state.org = event.target.value; loadKeys().catch(() => {}); });
  try {
    signedIn(await api("GET", "/ui/session"));
  } catch (_) {
    signedOut("");
  }
});
