// The live dashboard: polls /dashboard/api once a second with the admin token (if the
// service has one) as a Bearer header; the selected campaign is in the URL's #fragment.
"use strict";

const $ = (id) => document.getElementById(id);
const fmt = (n) => Number(n).toLocaleString("en-US");
let token = sessionStorage.getItem("coupon-admin-token") || "";
let selected = fragment() ?? "";
let timer = null;
// The list: as many pages of campaigns as the operator has asked for, of one status or all.
let pages = 1;
let filter = "";
let listRun = 0;

class Refused extends Error {}

function fragment() {
  // The campaign id in the URL's #fragment; null, and said, when it is not one (a link
  // cut short, #%ZZ): the page goes on without it.
  const raw = location.hash.slice(1);
  try {
    const id = decodeURIComponent(raw);
    $("link-error").textContent = "";
    return id;
  } catch {
    $("link-error").textContent = "Ignored the link's #" + raw + ": it is not a campaign id (cut short?).";
    return null;
  }
}

function tokenProblem(value) {
  // COUPON_ADMIN_TOKEN is printable ASCII without spaces: a token that is not cannot be
  // the service's, so it is refused here, as typed (never trimmed into another one).
  if (/\s/.test(value)) return "This token has spaces or line breaks: COUPON_ADMIN_TOKEN never has. Nothing was sent.";
  if (!/^[\x21-\x7e]*$/.test(value)) return "This token has characters outside printable ASCII: COUPON_ADMIN_TOKEN never has. Nothing was sent.";
  return "";
}

async function api(path) {
  const problem = tokenProblem(token);
  if (problem) throw new Refused(problem);
  let headers;
  try {
    headers = new Headers(token ? { Authorization: "Bearer " + token } : {});
  } catch {
    throw new Refused("This browser cannot send this token in a header. Nothing was sent.");
  }
  let response;
  try {
    response = await fetch("/dashboard/api/" + path, { headers, cache: "no-store" });
  } catch {
    throw new Error("cannot reach the service");
  }
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) {
    throw new Refused(token ? "The service refused this token: it is not its COUPON_ADMIN_TOKEN." : body.message || "unauthenticated");
  }
  if (!response.ok) throw new Error((body.code || response.status) + ": " + (body.message || ""));
  return body;
}

function askForToken(message) {
  // Stop polling until a token is given.
  if (timer) clearInterval(timer);
  timer = null;
  $("login").hidden = false;
  $("login-error").textContent = token ? message : "";
  $("token").focus();
}

function cell(row, text, className) {
  const td = row.insertCell();
  if (className) {
    const span = document.createElement("span");
    span.className = className;
    span.textContent = text;
    td.appendChild(span);
  } else {
    td.textContent = text;
  }
}

function nameCell(row, name) {
  // Cut with an ellipsis by the style sheet when long; whole in the title (as text, like
  // the cell: a name is never parsed as HTML).
  const td = row.insertCell();
  td.className = "name";
  td.title = name;
  td.textContent = name;
}

function utc(iso) {
  // One convention for every time on the page, the command line's: UTC, marked Z.
  return iso ? new Date(iso).toISOString().slice(0, 19).replace("T", " ") + "Z" : "–";
}

async function listCampaigns() {
  // The pages shown, from the newest, each asked for with the previous page's token.
  const campaigns = [];
  let next = "";
  let serverTime = null;
  for (let page = 0; page < pages; page++) {
    const query = new URLSearchParams();
    if (filter) query.set("status", filter);
    if (next) query.set("pageToken", next);
    const search = query.toString();
    const body = await api("campaigns" + (search ? "?" + search : ""));
    campaigns.push(...body.campaigns);
    next = body.nextPageToken || "";
    serverTime = body.serverTime;
    if (!next) break;
  }
  return { campaigns, next, serverTime };
}

async function loadCampaigns() {
  const run = ++listRun;
  try {
    const body = await listCampaigns();
    if (run !== listRun) return true;  // a newer listing (another filter or page) won
    $("clock").textContent = "server time " + utc(body.serverTime);
    $("login").hidden = true;
    $("list-error").textContent = "";
    $("more").hidden = !body.next;
    const tbody = $("campaigns").tBodies[0];
    tbody.replaceChildren();
    for (const c of body.campaigns) {
      const row = tbody.insertRow();
      row.dataset.id = c.id;
      if (c.id === selected) row.classList.add("selected");
      nameCell(row, c.name);
      cell(row, c.status.replace("_", " "), "status " + c.status);
      cell(row, fmt(c.issuedCount) + " / " + fmt(c.totalCoupons));
      cell(row, utc(c.startsAt).replace(/:\d\dZ$/, "Z"));  // to the minute: room for the name
      row.cells[3].title = utc(c.startsAt);
      row.addEventListener("click", () => select(c.id));
    }
    if (!body.campaigns.length) $("list-error").textContent = filter ? "No " + filter.replace("_", " ") + " campaigns." : "No campaigns yet.";
    return true;
  } catch (error) {
    if (error instanceof Refused) askForToken(error.message);
    else $("list-error").textContent = String(error.message || error);
    return false;
  }
}

function drawChart(seconds) {
  const svg = $("chart");
  const width = 600, height = 140, n = seconds.length || 1;
  const top = Math.max(1, ...seconds.map((s) => s.issued + s.alreadyIssued + s.refused));
  const bar = width / n;
  const parts = [];
  seconds.forEach((s, i) => {
    let y = height;
    for (const [value, color] of [[s.issued, "#2f6fed"], [s.alreadyIssued, "#93c5fd"], [s.refused, "#fca5a5"]]) {
      const h = (value / top) * (height - 4);
      if (h > 0) {
        y -= h;
        parts.push(`<rect x="${(i * bar).toFixed(2)}" y="${y.toFixed(2)}" width="${Math.max(bar - 1, 1).toFixed(2)}" height="${h.toFixed(2)}" fill="${color}"/>`);
      }
    }
  });
  svg.innerHTML = parts.join("");
}

async function loadLive() {
  if (!selected) {
    $("live-body").hidden = true;
    $("live-title").textContent = "Select a campaign";
    return;
  }
  try {
    const v = await api("campaigns/" + encodeURIComponent(selected));
    const c = v.campaign;
    $("live-error").textContent = "";
    $("live-body").hidden = false;
    $("live-title").textContent = c.name;
    $("issued").textContent = fmt(c.issuedCount);
    $("issued-of").textContent = "of " + fmt(c.totalCoupons);
    // Once ended, what was never issued never will be: not stock any more.
    $("remaining-label").textContent = c.status === "ended" ? "Unissued (ended)" : "Remaining stock";
    $("remaining").textContent = fmt(c.remaining);
    const end = c.endedAt || c.endsAt;
    $("status").textContent = c.status === "ended" ? "none can be issued" : c.status.replace("_", " ");
    $("status").title = c.status === "ended" && end ? "ended " + utc(end) : "";
    // Without the live figures (Redis down), the counts above still hold: say so, show none.
    const missing = v.figuresMissing;
    $("live-error").textContent = missing ? "Live figures unavailable (" + missing + "); issued and stock are from PostgreSQL." : "";
    $("rate").textContent = missing ? "–" : fmt(v.issuedPerSecond);
    $("p99").textContent = missing || v.p99Ms === null ? "–" : (v.p99Ms < 10 ? v.p99Ms.toFixed(2) : v.p99Ms.toFixed(0)) + " ms";
    $("requests").textContent = missing ? "–" : fmt(v.requests);
    $("window").textContent = missing ? "" : "last " + v.windowSeconds + " s";
    const tbody = $("refusals").tBodies[0];
    tbody.replaceChildren();
    const reasons = Object.entries(v.refusals);
    for (const [reason, count] of reasons) {
      const row = tbody.insertRow();
      row.dataset.reason = reason;
      cell(row, reason);
      cell(row, fmt(count));
    }
    if (!reasons.length) {
      const row = tbody.insertRow();
      cell(row, missing ? "–" : "none");
      cell(row, "");
    }
    drawChart(v.seconds);
    freshAt = v.serverTime;
    failingSince = null;
    $("live-body").classList.remove("stale");
    $("updated").textContent = "updated at server time " + utc(v.serverTime);
    $("clock").textContent = "server time " + utc(v.serverTime);
  } catch (error) {
    if (error instanceof Refused) askForToken(error.message);
    else liveFailed(error);
  }
}

function select(id) {
  if (id !== selected) freshAt = "";
  selected = id;
  $("link-error").textContent = "";
  history.replaceState(null, "", "#" + encodeURIComponent(id));
  const rows = [...$("campaigns").tBodies[0].rows];
  for (const row of rows) row.classList.toggle("selected", row.dataset.id === id);
  // A campaign newer than the list: refresh the list too.
  if (!rows.some((row) => row.dataset.id === id)) loadCampaigns();
  loadLive();
}

// When the live panel last showed fresh figures (the server's time), and since when its
// updates have failed: figures that stopped updating are greyed and say since when.
let freshAt = "";
let failingSince = null;

function liveFailed(error) {
  if (failingSince === null) failingSince = new Date();
  $("live-body").classList.add("stale");
  const since = utc(failingSince.toISOString());
  const shown = freshAt ? "; the figures shown are from " + utc(freshAt) : "";
  $("live-error").textContent = String(error.message || error) + " since " + since + shown + ".";
}

let ticks = 0;
async function tick() {
  // The live panel every second, the list every fifth.
  if (ticks++ % 5 === 0) await loadCampaigns();
  await loadLive();
}

function start() {
  if (timer) clearInterval(timer);
  ticks = 0;
  tick();
  timer = setInterval(tick, 1000);
}

$("more").addEventListener("click", () => {
  pages++;
  loadCampaigns();
});
$("status-filter").addEventListener("change", () => {
  filter = $("status-filter").value;
  pages = 1;
  loadCampaigns();
});
$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  token = $("token").value;
  sessionStorage.setItem("coupon-admin-token", token);
  start();
});
window.addEventListener("hashchange", () => {
  const id = fragment();
  if (id !== null) select(id);
});
start();
