// The ZoneMTA-py web console: a tiny hash router, api() for every request, a function per page.
//
// Every value that comes from the API is put in the page with textContent and DOM calls
// (el(), svg() below), never with innerHTML: the data holds remote servers' replies and the
// addresses of whoever sends mail. The API key is kept in sessionStorage and sent as
// X-API-Key; no cookie is used (see console.py).

const KEY = "zmta.apiKey";
const LOGIN_ERROR = "zmta.loginError";
const AFTER_LOGIN = "zmta.afterLogin";
// The API's root: where /ui is mounted, so the console works behind a path prefix too.
const BASE = location.pathname.replace(/\/ui(\/[^/]*)?$/, "");
const REFRESH_MS = 5000;
const HOUR = 3600 * 1000;
const SVG_NS = "http://www.w3.org/2000/svg";
const SERIES = ["queued", "delivered", "deferred", "bounced"];
const ACTIONS = ["QUEUED", "ACCEPTED", "DEFERRED", "REJECTED", "DELETED", "DROP", "QUEUE_BOUNCE", "HELD", "RELEASED"];
const OUTCOMES = { ACCEPTED: "delivered", REJECTED: "bounced", QUEUE_BOUNCE: "bounced", DELETED: "dropped", DROP: "dropped" };

// ---------------------------------------------------------------------------------------
// The API

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** fetch() on the API with the key; the parsed JSON (or text) of a 2xx, else an ApiError.
 *  A 401 or 403 also sends the operator to the login page with the API's error. */
async function api(path, options = {}) {
  const { json, ...init } = options;
  const headers = new Headers(init.headers || {});
  const key = sessionStorage.getItem(KEY);
  if (key) headers.set("X-API-Key", key);
  if (json !== undefined) {
    headers.set("Content-Type", "application/json");
    init.body = JSON.stringify(json);
  }
  const response = await fetch(BASE + path, { ...init, headers, cache: "no-store", credentials: "omit" });
  if (!response.ok) {
    const message = await errorOf(response);
    if (response.status === 401 || response.status === 403) toLogin(message);
    throw new ApiError(response.status, message);
  }
  const type = response.headers.get("Content-Type") || "";
  return type.includes("json") ? response.json() : response.text();
}

async function errorOf(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && typeof body.error === "string") return body.error;
  } catch {
    // not JSON: the text itself, or the status line
  }
  return text.trim().slice(0, 300) || `${response.status} ${response.statusText}`;
}

function toLogin(message) {
  const hadKey = sessionStorage.getItem(KEY) !== null;
  sessionStorage.removeItem(KEY);
  if (route().name === "login") return; // the login page shows the error itself
  if (hadKey) sessionStorage.setItem(LOGIN_ERROR, message); // none yet: just the login page
  sessionStorage.setItem(AFTER_LOGIN, location.hash);
  location.hash = "#/login";
}

const enc = encodeURIComponent;

// ---------------------------------------------------------------------------------------
// DOM helpers: text is always a text node, attributes always setAttribute.

function setAttrs(node, attrs) {
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    if (name.startsWith("on") && typeof value === "function") node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
}

function children(list) {
  return list.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false)
    .map((c) => (c instanceof Node ? c : String(c)));
}

function el(tag, attrs = {}, ...kids) {
  const node = document.createElement(tag);
  setAttrs(node, attrs);
  node.append(...children(kids));
  return node;
}

function svg(tag, attrs = {}, ...kids) {
  const node = document.createElementNS(SVG_NS, tag);
  setAttrs(node, attrs);
  node.append(...children(kids));
  return node;
}

function table(headings, rows, attrs = {}) {
  if (!rows.length) return el("p", { class: "muted empty" }, attrs.empty || "Nothing here.");
  delete attrs.empty;
  return el("table", attrs, el("thead", {}, el("tr", {}, headings.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
}

function panel(title, id) {
  const body = el("div", { class: "panel-body" }, el("p", { class: "muted" }, "Loading…"));
  const section = el("section", { class: "panel", id }, el("h2", {}, title), body);
  return { section, body };
}

/** Fill a container with what build() returns, or with the error it threw. */
async function fill(body, build) {
  try {
    body.replaceChildren(...children([await build()]));
  } catch (err) {
    body.replaceChildren(errorBox(err));
  }
}

function errorBox(err) {
  const status = err instanceof ApiError ? ` (HTTP ${err.status})` : "";
  return el("p", { class: "error" }, `${err.message}${status}`);
}

function button(label, onclick, attrs = {}) {
  return el("button", { type: "button", ...attrs, onclick }, label);
}

let flashTimer = 0;
function flash(message, kind = "info") {
  const box = document.getElementById("flash");
  box.textContent = message;
  box.className = kind;
  box.hidden = false;
  clearTimeout(flashTimer);
  flashTimer = setTimeout(() => { box.hidden = true; }, 8000);
}

// ---------------------------------------------------------------------------------------
// Formatting

function pad(n) {
  return String(n).padStart(2, "0");
}

/** A time (ISO 8601 string or ms since the epoch) as local "YYYY-MM-DD HH:MM:SS". */
function when(value) {
  if (value === null || value === undefined || value === "") return "";
  const d = new Date(value);
  if (Number.isNaN(d.getTime())) return String(value);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${clock(d)}`;
}

function clock(d) {
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function age(ms) {
  if (ms === null || ms === undefined) return "—";
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

function text(value) {
  if (value === null || value === undefined) return "";
  if (Array.isArray(value)) return value.join(", ");
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

/** 1, 2 or 5 times a power of ten, at least n: the top of a chart's axis. */
function niceMax(n) {
  const power = 10 ** Math.floor(Math.log10(Math.max(n, 1)));
  return [1, 2, 5, 10].map((f) => f * power).find((v) => v >= n);
}

// ---------------------------------------------------------------------------------------
// Charts (inline SVG)

const COLORS = { queued: "#2563eb", delivered: "#16a34a", deferred: "#d97706", bounced: "#dc2626" };

/** Messages per hour: for each hour of `buckets` (ms), a bar per series side by side. */
function hourlyChart(series, buckets, attrs) {
  const W = 640, H = 210, L = 40, R = 8, T = 12, B = 26;
  const max = niceMax(Math.max(1, ...series.flatMap((s) => s.values)));
  const slot = (W - L - R) / buckets.length;
  const bar = (slot * 0.8) / series.length;
  const y = (v) => T + (H - T - B) * (1 - v / max);
  const chart = svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", ...attrs });
  for (const v of max % 2 ? [0, max] : [0, max / 2, max]) {
    chart.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: y(v), y2: y(v) }),
      svg("text", { class: "axis", x: L - 6, y: y(v) + 4, "text-anchor": "end" }, String(v)));
  }
  const step = Math.max(1, Math.ceil(buckets.length / 8));
  buckets.forEach((b, i) => {
    const left = L + i * slot;
    if ((buckets.length - 1 - i) % step === 0) {
      chart.append(svg("text", { class: "axis", x: left + slot / 2, y: H - 8, "text-anchor": "middle" },
        `${pad(new Date(b).getHours())}:00`));
    }
    series.forEach((s, k) => {
      const v = s.values[i];
      if (!v) return;
      chart.append(svg("rect", { x: left + slot * 0.1 + k * bar, y: y(v), width: bar, height: y(0) - y(v), fill: COLORS[s.name], "data-series": s.name },
        svg("title", {}, `${when(b)}: ${v} ${s.name}`)));
    });
  });
  return chart;
}

function legend(names) {
  return el("p", { class: "legend" }, names.map((n) =>
    el("span", {}, svg("svg", { viewBox: "0 0 10 10", class: "swatch" }, svg("rect", { width: 10, height: 10, fill: COLORS[n] })), n)));
}

/** Horizontal stacked bars, one per row: [{label, values: {name: n}}]. */
function barChart(rows, names, attrs) {
  const W = 400, row = 30, L = 90, R = 40;
  const H = Math.max(1, rows.length) * row + 8;
  const max = niceMax(Math.max(1, ...rows.map((r) => names.reduce((sum, n) => sum + (r.values[n] || 0), 0))));
  const chart = svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", ...attrs });
  rows.forEach((r, i) => {
    const top = 4 + i * row;
    chart.append(svg("text", { class: "axis", x: L - 8, y: top + 18, "text-anchor": "end" }, r.label));
    let left = L, total = 0;
    for (const n of names) {
      const v = r.values[n] || 0;
      const width = ((W - L - R) * v) / max;
      total += v;
      if (v) {
        chart.append(svg("rect", { x: left, y: top + 3, width, height: row - 8, fill: COLORS[n], "data-series": n },
          svg("title", {}, `${r.label}: ${v} ${n}`)));
      }
      left += width;
    }
    chart.append(svg("text", { class: "axis", x: left + 6, y: top + 18 }, String(total)));
  });
  return chart;
}

/** A ranked list with a bar for each count: [{name, count}]. */
function rankList(items, label, attrs) {
  const max = Math.max(1, ...items.map((i) => i.count));
  return table([label, "messages", ""], items.map((item) =>
    el("tr", {}, el("td", {}, text(item.name)), el("td", { class: "num" }, String(item.count)),
      el("td", { class: "barcell" }, svg("svg", { class: "bar", viewBox: "0 0 100 10", preserveAspectRatio: "none" },
        svg("rect", { width: (100 * item.count) / max, height: 10 }))))),
  { ...attrs, empty: "None in this period." });
}

// ---------------------------------------------------------------------------------------
// Router: #/<page>/<arg>?<params>; each page gets (view, route, gen) and may refresh itself
// while gen is the page on screen.

const pages = {
  "": dashboardPage,
  login: loginPage,
  queue: queuePage,
  message: messagePage,
  log: logPage,
  suppression: suppressionPage,
  blacklist: blacklistPage,
  pauses: pausesPage,
  shaping: shapingPage,
};

let screen = { gen: 0, timers: [] };

function route() {
  const hash = location.hash.replace(/^#\/?/, "");
  const q = hash.indexOf("?");
  const path = q < 0 ? hash : hash.slice(0, q);
  const [name = "", ...args] = path.split("/").map((part) => decodeURIComponent(part));
  return { name, args, params: new URLSearchParams(q < 0 ? "" : hash.slice(q + 1)) };
}

function current(gen) {
  return gen === screen.gen;
}

function go(hash) {
  if (location.hash === hash) render();
  else location.hash = hash;
}

function hashWith(name, params) {
  const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== "" && v !== null && v !== undefined));
  const q = query.toString();
  return `#/${name}${q ? `?${q}` : ""}`;
}

/** Run refresh() now and then every REFRESH_MS while the page is on screen; an error is
 *  shown and the next refresh tries again. */
async function live(gen, refresh) {
  if (!current(gen)) return;
  try {
    await refresh();
  } catch (err) {
    if (current(gen)) flash(err.message, "error");
  }
  if (current(gen)) screen.timers.push(setTimeout(() => live(gen, refresh), REFRESH_MS));
}

function render() {
  screen.timers.forEach(clearTimeout);
  screen = { gen: screen.gen + 1, timers: [] };
  const r = route();
  const show = pages[r.name] || notFoundPage;
  document.body.classList.toggle("signed-out", r.name === "login");
  for (const link of document.querySelectorAll("#nav a")) {
    link.classList.toggle("active", link.dataset.route === (r.name === "message" ? "queue" : r.name));
  }
  const view = document.getElementById("view");
  view.replaceChildren();
  document.getElementById("flash").hidden = true;
  const gen = screen.gen;
  Promise.resolve(show(view, r, gen)).catch((err) => {
    if (current(gen)) view.append(errorBox(err));
  });
}

function notFoundPage(view) {
  view.append(el("h1", {}, "Not found"), el("p", {}, el("a", { href: "#/" }, "Back to the dashboard")));
}

// ---------------------------------------------------------------------------------------
// Login

function loginPage(view) {
  const error = sessionStorage.getItem(LOGIN_ERROR);
  sessionStorage.removeItem(LOGIN_ERROR);
  const input = el("input", { type: "password", id: "api-key", name: "key", autocomplete: "off", required: false });
  const message = el("p", { id: "login-error", class: "error", role: "alert", hidden: !error }, error || "");
  const submit = el("button", { type: "submit", id: "login-submit" }, "Sign in");
  const form = el("form", { id: "login", class: "login" },
    el("h1", {}, "ZoneMTA-py console"),
    el("label", { for: "api-key" }, "API key (scope admin)"), input, message, submit,
    el("p", { class: "muted" }, "Make one with ", el("code", {}, "python -m zmta_api new-key --name console --scopes admin"),
      ". The key stays in this tab (sessionStorage) and is sent only to this API. Leave it empty if the API is open."));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (key) sessionStorage.setItem(KEY, key);
    else sessionStorage.removeItem(KEY);
    submit.disabled = true;
    try {
      await api("/zones");
      const next = sessionStorage.getItem(AFTER_LOGIN) || "#/";
      sessionStorage.removeItem(AFTER_LOGIN);
      go(next.startsWith("#/login") ? "#/" : next);
    } catch (err) {
      sessionStorage.removeItem(KEY);
      message.textContent = err.message;
      message.hidden = false;
    } finally {
      submit.disabled = false;
    }
  });
  view.append(form);
  input.focus();
}

// ---------------------------------------------------------------------------------------
// Dashboard

async function dashboardPage(view, r, gen) {
  const hours = Math.min(168, Math.max(1, parseInt(r.params.get("hours"), 10) || 24));
  const updated = el("span", { id: "updated" }, "");
  const choice = el("select", { id: "hours", onchange: (e) => go(hashWith("", { hours: e.target.value })) },
    [6, 24, 48, 168].map((h) => el("option", { value: h, selected: h === hours }, `${h} hours`)));
  const queue = panel("Queue per zone", "queue-panel");
  const traffic = panel("Messages per hour, per zone", "traffic-panel");
  const domains = panel("Top destination domains", "domains-panel");
  const categories = panel("Top bounce categories", "categories-panel");
  view.append(el("div", { class: "title" }, el("h1", {}, "Dashboard"), el("span", { class: "muted" }, "Period: ", choice, " ", updated)),
    el("div", { class: "grid" }, queue.section, domains.section, categories.section, traffic.section));
  await live(gen, async () => {
    await Promise.all([fill(queue.body, queueSummary), statsPanels(hours, traffic.body, domains.body, categories.body)]);
    if (current(gen)) updated.textContent = `updated ${clock(new Date())}`;
  });
}

async function zoneNames() {
  return (await api("/zones")).map((z) => z.name);
}

async function oldestCreated(zone) {
  const first = async (type) => (await api(`/queued/${type}/${enc(zone)}?sort=created&order=asc&pageSize=1`)).list[0];
  const times = (await Promise.all([first("queued"), first("deferred"), first("held")])).filter(Boolean).map((row) => Date.parse(row.created));
  return times.length ? Math.min(...times) : null;
}

async function queueSummary() {
  const [configured, counters] = await Promise.all([zoneNames(), api("/counter/zone/")]);
  const count = (list) => Object.fromEntries(list.entries.map((e) => [e.key, e.value]));
  const active = count(counters.active), deferred = count(counters.deferred);
  const zones = [...new Set([...configured, ...Object.keys(active), ...Object.keys(deferred)])].sort();
  const oldest = await Promise.all(zones.map(oldestCreated));
  const now = Date.now();
  const rows = zones.map((zone, i) => el("tr", { "data-zone": zone },
    el("td", {}, el("a", { href: hashWith("queue", { zone }) }, zone)),
    el("td", { class: "num" }, String(active[zone] || 0)),
    el("td", { class: "num" }, String(deferred[zone] || 0)),
    el("td", { class: "num" }, oldest[i] === null ? "—" : age(now - oldest[i]))));
  const bars = zones.map((zone) => ({ label: zone, values: { queued: active[zone] || 0, deferred: deferred[zone] || 0 } }));
  return [barChart(bars, ["queued", "deferred"], { "data-chart": "queue", "aria-label": "queue size per zone" }),
    legend(["queued", "deferred"]),
    table(["zone", "queued", "deferred", "oldest message"], rows, { id: "queue-table" })];
}

async function statsPanels(hours, traffic, domains, categories) {
  let stats, zones;
  try {
    [stats, zones] = await Promise.all([api(`/log/stats?hours=${hours}`), zoneNames()]);
  } catch (err) {
    for (const body of [traffic, domains, categories]) body.replaceChildren(errorBox(err));
    return;
  }
  const top = Math.floor(Date.now() / HOUR) * HOUR;
  const buckets = Array.from({ length: hours }, (_, i) => top - (hours - 1 - i) * HOUR);
  const names = [...new Set([...zones, ...stats.hours.map((h) => h.zone)])].sort();
  const figures = names.map((zone) => {
    const byHour = new Map(stats.hours.filter((h) => h.zone === zone).map((h) => [Math.floor(Date.parse(h.hour) / HOUR) * HOUR, h]));
    const series = SERIES.map((name) => ({ name, values: buckets.map((b) => Number((byHour.get(b) || {})[name] || 0)) }));
    return el("figure", { class: "zone-chart" }, el("figcaption", {}, zone),
      hourlyChart(series, buckets, { "data-chart": "hourly", "data-zone": zone, "aria-label": `${zone}: messages per hour` }));
  });
  traffic.replaceChildren(legend(SERIES), el("div", { class: "charts" }, figures));
  domains.replaceChildren(rankList(stats.domains.map((d) => ({ name: d.domain, count: d.count })), "domain", { id: "domains-table" }));
  categories.replaceChildren(rankList(stats.categories.map((c) => ({ name: c.category, count: c.count })), "category", { id: "categories-table" }));
}

// ---------------------------------------------------------------------------------------
// Queue browser

function choose(value, allowed, fallback) {
  return allowed.includes(value) ? value : fallback;
}

async function queuePage(view, r, gen) {
  const p = r.params;
  const zones = await zoneNames();
  const zone = p.get("zone") || (zones.includes("default") ? "default" : zones[0] || "default");
  const state = choose(p.get("state"), ["queued", "deferred", "held"], "queued");
  const sort = choose(p.get("sort"), ["id", "created", "queued"], "created");
  const order = choose(p.get("order"), ["asc", "desc"], "desc");
  const size = choose(p.get("pageSize"), ["25", "50", "100", "500"], "50");
  const domain = p.get("domain") || "";
  const filters = { zone, state, domain, sort, order, pageSize: size };
  const select = (name, options, value) => el("select", { id: `f-${name}`, name, onchange: (e) => go(hashWith("queue", { ...filters, ...(name === "zone" ? { domain: "" } : {}), [name]: e.target.value })) },
    options.map(([v, label]) => el("option", { value: v, selected: v === value }, label)));
  const counter = await api(`/counter/zone/${enc(zone)}`);
  const domains = new Map();
  for (const e of [...counter.active.entries, ...counter.deferred.entries]) domains.set(e.key, (domains.get(e.key) || 0) + e.value);
  if (domain && !domains.has(domain)) domains.set(domain, 0);
  view.append(el("h1", {}, "Queue"),
    el("form", { class: "filters", id: "queue-filters", onsubmit: (e) => e.preventDefault() },
      el("label", {}, "zone ", select("zone", [...new Set([...zones, zone])].map((z) => [z, z]), zone)),
      el("label", {}, "state ", select("state", [["queued", "queued"], ["deferred", "deferred"], ["held", "held"]], state)),
      el("label", {}, "domain ", select("domain", [["", "any"], ...[...domains].sort().map(([d, n]) => [d, `${d} (${n})`])], domain)),
      el("label", {}, "sort ", select("sort", [["created", "created"], ["queued", "next attempt"], ["id", "id"]], sort)),
      el("label", {}, "order ", select("order", [["desc", "newest first"], ["asc", "oldest first"]], order)),
      el("label", {}, "per page ", select("pageSize", ["25", "50", "100", "500"].map((n) => [n, n]), size))));
  const results = el("div", { id: "queue-results" });
  const pager = el("div", { class: "pager" });
  view.append(results, pager);
  const cursors = [null];
  let index = 0;
  const load = async () => {
    const q = new URLSearchParams({ pageSize: size });
    if (domain) q.set("domain", domain);
    if (cursors[index]) q.set("cursor", cursors[index]);
    else { q.set("sort", sort); q.set("order", order); }
    const data = await api(`/queued/${enc(state)}/${enc(zone)}?${q}`);
    if (!current(gen)) return;
    cursors[index + 1] = data.next;
    results.replaceChildren(table(["message", "seq", "recipient", "created", "next attempt", "attempts"], data.list.map((row) =>
      el("tr", { "data-id": row.id, "data-seq": row.seq },
        el("td", {}, el("a", { href: `#/message/${enc(row.id)}`, class: "mono" }, row.id)),
        el("td", { class: "mono" }, row.seq), el("td", {}, row.recipient), el("td", {}, when(row.created)),
        el("td", {}, when(row.queued)), el("td", { class: "num" }, String(row.deferred)))),
    { id: "queue-list", empty: `No ${state} deliveries in ${zone}${domain ? ` for ${domain}` : ""}.` }));
    pager.replaceChildren(
      button("← Previous", () => { index -= 1; load().catch(showError); }, { disabled: index === 0 }),
      el("span", {}, ` page ${index + 1} `),
      button("Next →", () => { index += 1; load().catch(showError); }, { disabled: !data.next }),
      button("Refresh", () => load().catch(showError)));
  };
  const showError = (err) => results.replaceChildren(errorBox(err));
  await load().catch(showError);
}

// ---------------------------------------------------------------------------------------
// One message

async function messagePage(view, r, gen) {
  const id = r.args[0] || "";
  const actions = el("div", { class: "actions", id: "message-actions" });
  const status = el("div", { id: "message-status" });
  const envelope = panel("Envelope", "envelope-panel");
  const deliveries = panel("Deliveries", "deliveries-panel");
  const history = panel("Log", "log-panel");
  const headers = panel("Headers", "headers-panel");
  view.append(el("h1", {}, "Message ", el("span", { class: "mono" }, id)), status, actions,
    envelope.section, deliveries.section, history.section, headers.section);
  let headersShown = false;
  const refresh = async () => {
    let data = null;
    try {
      data = await api(`/message/${enc(id)}`);
    } catch (err) {
      if (!(err instanceof ApiError) || err.status !== 404) throw err;
    }
    if (!current(gen)) return;
    if (data === null) {
      status.replaceChildren(el("p", { class: "notice", id: "gone" }, "This message is no longer in the queue: every delivery of it is done."));
      actions.replaceChildren();
      envelope.section.hidden = true;
      headers.section.hidden = !headersShown;
      let entries;
      try {
        entries = await messageLog(id);
      } catch (err) {
        for (const body of [deliveries.body, history.body]) body.replaceChildren(errorBox(err));
        return;
      }
      deliveries.body.replaceChildren(outcomes(entries));
      history.body.replaceChildren(logTable(entries, { id: "message-log" }));
      return;
    }
    status.replaceChildren();
    actions.replaceChildren(
      button("Retry all now", () => act(`/message/${enc(id)}`, "PUT", "Retry"), { "data-action": "retry-all" }),
      button("Hold", () => act(`/message/${enc(id)}/hold`, "POST", "Hold"), { "data-action": "hold" }),
      button("Release", () => act(`/message/${enc(id)}/hold`, "DELETE", "Release"), { "data-action": "release" }),
      button("Drop all", () => act(`/message/${enc(id)}`, "DELETE", "Drop", "Drop every delivery of this message (no bounce)?"), { "data-action": "drop-all", class: "danger" }));
    envelope.body.replaceChildren(envelopeList(data.meta));
    deliveries.body.replaceChildren(deliveryTable(id, data.messages));
    await fill(history.body, async () => logTable(data.log ?? (await messageLog(id)), { id: "message-log" }));
    if (!headersShown) {
      headersShown = true;
      headers.body.replaceChildren(
        el("pre", { id: "headers" }, (data.meta.headers || []).map((h) => h.line).join("\n")),
        button("Show the whole message", (e) => showSource(id, headers.body, e.target)));
    }
  };
  const act = async (path, method, label, question) => {
    if (question && !window.confirm(question)) return;
    try {
      const answer = await api(path, { method });
      const detail = answer && (answer.message || (answer.held !== undefined ? `${answer.held} held` : "") ||
        (answer.released !== undefined ? `${answer.released} released` : ""));
      flash(`${label}: ${detail || "done"}`);
    } catch (err) {
      flash(`${label}: ${err.message}`, "error");
    }
    await refresh().catch((err) => flash(err.message, "error"));
  };
  const deliveryTable = (messageId, list) => table(
    ["seq", "recipient", "zone", "status", "attempts", "next attempt", "last response", ""],
    list.map((d) => el("tr", { "data-seq": d.seq, "data-status": d.status },
      el("td", { class: "mono" }, d.seq), el("td", {}, d.recipient), el("td", {}, d.zone),
      el("td", {}, el("span", { class: `badge ${String(d.status).toLowerCase()}` }, d.lock ? `${d.status} (sending)` : d.status)),
      el("td", { class: "num" }, String(d.deferred ? d.deferred.count : 0)),
      el("td", {}, d.deferred ? when(d.deferred.next) : ""),
      el("td", { class: "response" }, d.deferred ? d.deferred.response : ""),
      el("td", { class: "row-actions" },
        button("Retry", () => act(`/message/${enc(messageId)}/${enc(d.seq)}`, "PUT", `Retry ${d.seq}`), { "data-action": "retry", "data-seq": d.seq }),
        button("Drop", () => act(`/message/${enc(messageId)}/${enc(d.seq)}`, "DELETE", `Drop ${d.seq}`, `Drop the delivery to ${d.recipient} (no bounce)?`),
          { "data-action": "drop", "data-seq": d.seq, class: "danger" })))),
    { id: "deliveries", empty: "No delivery left in the queue." });
  await live(gen, refresh);
}

async function messageLog(id) {
  const data = await api(`/log?${new URLSearchParams({ id, limit: "500" })}`);
  return data.entries.slice().reverse(); // the route gives newest first; a message reads oldest first
}

function envelopeList(meta) {
  const fields = [["from", meta.from], ["to", meta.to], ["message id", meta.messageId], ["date", meta.date],
    ["queued", when(meta.created || meta.time)], ["size", meta.bodySize === undefined ? "" : `${meta.bodySize} bytes (body)`],
    ["interface", meta.interface], ["via", meta.transtype], ["origin", meta.origin], ["user", meta.user || ""]];
  return el("dl", { class: "envelope" }, fields.map(([k, v]) => [el("dt", {}, k), el("dd", {}, text(v))]));
}

/** Each delivery's last word in the log: delivered, bounced, dropped or still waiting. */
function outcomes(entries) {
  const last = new Map();
  for (const e of entries) if (e.seq) last.set(e.seq, e);
  return table(["seq", "recipient", "outcome", "time", "response"], [...last.values()].map((e) =>
    el("tr", { "data-seq": e.seq, "data-outcome": OUTCOMES[e.action] || e.action.toLowerCase() },
      el("td", { class: "mono" }, e.seq), el("td", {}, text(e.to)),
      el("td", {}, el("span", { class: `badge ${(OUTCOMES[e.action] || e.action).toLowerCase()}` }, OUTCOMES[e.action] || e.action)),
      el("td", {}, when(e.time)), el("td", { class: "response" }, text(e.response || e.reason)))),
  { id: "outcomes", empty: "The log has nothing on this message." });
}

function logTable(entries, attrs, withMessage = false) {
  const head = ["time", "action", ...(withMessage ? ["message", "zone", "from"] : []), "seq", "to", "mx / ip", "response", "category", "next attempt"];
  return table(head, entries.map((e) => el("tr", { "data-action": e.action },
    el("td", { class: "nowrap" }, when(e.time)),
    el("td", {}, el("span", { class: `badge ${String(e.action).toLowerCase()}` }, e.action)),
    withMessage && el("td", {}, e.id ? el("a", { href: `#/message/${enc(e.id)}`, class: "mono" }, e.id) : ""),
    withMessage && el("td", {}, text(e.zone)), withMessage && el("td", {}, text(e.from)),
    el("td", { class: "mono" }, text(e.seq)), el("td", {}, text(e.to)),
    el("td", {}, [e.mx, e.ip].filter(Boolean).join(" / ")),
    el("td", { class: "response" }, text(e.response || e.reason)),
    el("td", {}, text(e.category)), el("td", { class: "nowrap" }, when(e.next_attempt)))),
  { ...attrs, empty: "No log entries." });
}

async function showSource(id, body, trigger) {
  trigger.disabled = true;
  try {
    const raw = await api(`/fetch/${enc(id)}`);
    const limit = 256 * 1024;
    body.append(el("pre", { id: "source" }, raw.length > limit ? `${raw.slice(0, limit)}\n… (${raw.length - limit} more characters)` : raw));
    trigger.remove();
  } catch (err) {
    trigger.disabled = false;
    body.append(errorBox(err));
  }
}

// ---------------------------------------------------------------------------------------
// Log search

async function logPage(view, r, gen) {
  const p = r.params;
  const zones = await zoneNames().catch(() => []);
  const field = (name, label, type = "text") => el("label", {}, `${label} `, el("input", { name, type, value: p.get(name) || "" }));
  const form = el("form", { class: "filters", id: "log-filters" },
    field("recipient", "recipient"), field("sender", "sender"), field("domain", "domain"), field("id", "message"),
    el("label", {}, "zone ", el("select", { name: "zone" }, el("option", { value: "" }, "any"),
      zones.map((z) => el("option", { value: z, selected: z === p.get("zone") }, z)))),
    el("label", {}, "action ", el("select", { name: "action" }, el("option", { value: "" }, "any"),
      ACTIONS.map((a) => el("option", { value: a, selected: a === p.get("action") }, a)))),
    field("since", "since", "datetime-local"), field("until", "until", "datetime-local"),
    el("button", { type: "submit" }, "Search"));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    go(hashWith("log", Object.fromEntries(new FormData(form))));
  });
  const results = el("div", { id: "log-results" });
  const more = el("div", { class: "pager" });
  view.append(el("h1", {}, "Log"), form, results, more);
  const query = new URLSearchParams({ limit: "100" });
  for (const name of ["recipient", "sender", "domain", "id", "zone", "action"]) if (p.get(name)) query.set(name, p.get(name));
  for (const name of ["since", "until"]) {
    const t = Date.parse(p.get(name) || "");
    if (!Number.isNaN(t)) query.set(name, new Date(t).toISOString());
  }
  const entries = [];
  const load = async (cursor) => {
    if (cursor) query.set("cursor", cursor);
    const data = await api(`/log?${query}`);
    if (!current(gen)) return;
    entries.push(...data.entries);
    results.replaceChildren(logTable(entries, { id: "log-table" }, true));
    more.replaceChildren(data.next ? button("More", () => load(data.next).catch(showError)) : "");
  };
  const showError = (err) => results.replaceChildren(errorBox(err));
  await load(null).catch(showError);
}

// ---------------------------------------------------------------------------------------
// Suppression list, blacklist marks, pauses, shaping overrides

async function suppressionPage(view, r, gen) {
  const list = el("div", { id: "suppression-list" });
  const kind = el("select", { name: "kind" }, el("option", { value: "address" }, "address"), el("option", { value: "domain" }, "domain"));
  const value = el("input", { name: "value", type: "text", required: true, placeholder: "user@example.com or example.com" });
  const form = el("form", { class: "filters", id: "suppress-form" }, kind, value, el("button", { type: "submit" }, "Suppress"));
  const reload = () => fill(list, async () => {
    const data = await api("/suppressionlist");
    return table(["address or domain", "kind", "since", ""], data.suppressed.map((e) => el("tr", { "data-id": e.id },
      el("td", {}, e.address || e.domain), el("td", {}, e.address ? "address" : "domain"), el("td", {}, when(e.created)),
      el("td", {}, button("Remove", () => change(`/suppressionlist?${new URLSearchParams({ id: e.id })}`, { method: "DELETE" }, "Removed"))))),
    { empty: "Nothing is suppressed." });
  });
  const change = async (path, init, label) => {
    try {
      await api(path, init);
      flash(label);
    } catch (err) {
      flash(err.message, "error");
    }
    await reload();
  };
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    await change("/suppressionlist", { method: "POST", json: { [kind.value]: value.value.trim() } }, `Suppressed ${value.value.trim()}`);
    value.value = "";
  });
  view.append(el("h1", {}, "Suppression list"),
    el("p", { class: "muted" }, "Mail to these addresses and domains is dropped at intake, without a bounce."), form, list);
  await live(gen, reload);
}

async function blacklistPage(view, r, gen) {
  const list = el("div", { id: "blacklist" });
  view.append(el("h1", {}, "Blacklist marks"),
    el("p", { class: "muted" }, "Local addresses a recipient domain said are listed: not used for that domain until the mark expires."), list);
  await live(gen, () => fill(list, async () => {
    const data = await api("/blacklist");
    return table(["local address", "domain", "reply", "since", "until", "delivery"], data.list.map((m) => el("tr", {},
      el("td", { class: "mono" }, m.address), el("td", {}, m.domain), el("td", { class: "response" }, m.response),
      el("td", {}, when(m.created)), el("td", {}, when(m.expires)),
      el("td", {}, el("a", { href: `#/message/${enc(m.id)}`, class: "mono" }, `${m.id}.${m.seq}`)))),
    { empty: "No address is marked." });
  }));
}

async function pausesPage(view, r, gen) {
  const zones = await zoneNames();
  const list = el("div", { id: "pause-list" });
  const zone = el("select", { name: "zone" }, zones.map((z) => el("option", { value: z }, z)));
  const domain = el("input", { name: "domain", type: "text", placeholder: "recipient domain (empty: the whole zone)" });
  const form = el("form", { class: "filters", id: "pause-form" }, zone, domain, el("button", { type: "submit" }, "Pause"));
  const path = (z, d) => `/pause/${enc(z)}${d ? `/${enc(d)}` : ""}`;
  const change = async (method, z, d, label) => {
    try {
      await api(path(z, d), { method });
      flash(label);
    } catch (err) {
      flash(err.message, "error");
    }
    await reload();
  };
  const reload = () => fill(list, async () => {
    const data = await api("/pause");
    return table(["zone", "domain", "since", ""], data.paused.map((p) => el("tr", {},
      el("td", {}, p.zone), el("td", {}, p.domain === null ? "(the whole zone)" : p.domain), el("td", {}, when(p.created)),
      el("td", {}, button("Resume", () => change("DELETE", p.zone, p.domain, `Resumed ${p.zone}${p.domain ? ` / ${p.domain}` : ""}`))))),
    { empty: "Nothing is paused." });
  });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const d = domain.value.trim();
    await change("POST", zone.value, d, `Paused ${zone.value}${d ? ` / ${d}` : ""}`);
    domain.value = "";
  });
  view.append(el("h1", {}, "Pauses"), el("p", { class: "muted" }, "A paused zone or domain keeps its mail queued until resumed."), form, list);
  await live(gen, reload);
}

async function shapingPage(view, r, gen) {
  const list = el("div", { id: "shaping-list" });
  const reload = () => fill(list, async () => {
    const data = await api("/shaping");
    return table(["zone", "scope", "site", "address", "rule", "action", "limits", "since", "until", "reply", ""],
      data.shaping.map((o) => el("tr", {},
        el("td", {}, o.zone), el("td", {}, o.scope), el("td", {}, text(o.site)), el("td", { class: "mono" }, text(o.address)),
        el("td", {}, o.rule), el("td", {}, o.action),
        el("td", {}, o.action === "throttle" ? `${text(o.connections)} conn., ${text(o.rate)}` : ""),
        el("td", {}, when(o.started)), el("td", {}, when(o.expires)), el("td", { class: "response" }, o.response),
        el("td", {}, button("Lift", () => lift(o))))),
    { empty: "No override is in force: the configured limits apply." });
  });
  const lift = async (o) => {
    const q = new URLSearchParams();
    if (o.site) q.set("site", o.site);
    if (o.address) q.set("address", o.address);
    try {
      await api(`/shaping/${enc(o.zone)}${q.toString() ? `?${q}` : ""}`, { method: "DELETE" });
      flash(`Lifted ${o.rule} in ${o.zone}`);
    } catch (err) {
      flash(err.message, "error");
    }
    await reload();
  };
  view.append(el("h1", {}, "Shaping overrides"),
    el("p", { class: "muted" }, "What adaptive traffic shaping holds back right now; lifting one applies the configured limits again."), list);
  await live(gen, reload);
}

// ---------------------------------------------------------------------------------------

document.getElementById("logout").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  go("#/login");
});
window.addEventListener("hashchange", render);
render();
