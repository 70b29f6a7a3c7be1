// The dashboard: stacked bars of counts per status from /status-series, and the totals from
// /status-count for the very same start and end, fetched again every REFRESH_MS until paused.
// Times are UTC, as in the API.
"use strict";

const REFRESH_MS = 5000;
const REQUEST_TIMEOUT_MS = 15000;  // above the API's own 10 s deadline on a store that hangs
const MOST_BARS = 300;  // a custom range gets the smallest step that keeps its bars readable
const STEPS = {"1m": 60, "5m": 300, "15m": 900, "1h": 3600, "6h": 21600, "1d": 86400};  // the API's, in seconds
const PRESETS = {"15m": [900, "1m"], "1h": [3600, "1m"], "24h": [86400, "15m"], "7d": [604800, "1h"]};
// Okabe and Ito's colours, which stay apart with the common colour-vision deficiencies.
const COLOURS = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442"];

// With API_TOKEN set the API answers 401 without it: the page asks for it and keeps it in
// sessionStorage, so it is sent by this tab only and forgotten when the tab closes.
const TOKEN_KEY = "status-api-token";

class Problem extends Error {}
class NeedsToken extends Problem {}

const $ = (id) => document.getElementById(id);
const chart = $("chart");
let paused = false, timer = null, generation = 0, updatedAt = null, shown = "";

function bucketCount(startMs, endMs, stepSeconds) {  // as the API counts them: aligned to UTC, ends clipped
  const step = stepSeconds * 1000;
  return startMs < endMs ? Math.ceil(endMs / step) - Math.floor(startMs / step) : 0;
}

const iso = (ms) => new Date(ms).toISOString().replace(".000Z", "Z");
const inputValue = (ms) => new Date(ms).toISOString().slice(0, 19);  // datetime-local, read as UTC
const plotlyTime = (text) => text.replace("Z", "");  // plotly.js draws times as given, here UTC
const shortTime = (text) => text.replace("T", " ").replace(/(\.\d+)?Z$/, "");
const format = (count) => count.toLocaleString("en-US");

function view() {
  const range = $("range").value;
  if (range in PRESETS) {
    const [seconds, step] = PRESETS[range];
    const end = Math.ceil(Date.now() / 1000) * 1000;
    return {start: end - seconds * 1000, end, step};
  }
  const start = Date.parse($("custom-start").value + "Z"), end = Date.parse($("custom-end").value + "Z");
  if (isNaN(start) || isNaN(end)) throw new Problem("Choose a start and an end (UTC).");
  if (start >= end) throw new Problem("The start must be before the end.");
  // Past 300 days even 1d makes more than 300 bars; the API refuses past 1,500 and says so.
  const step = Object.keys(STEPS).find((name) => bucketCount(start, end, STEPS[name]) <= MOST_BARS) || "1d";
  return {start, end, step};
}

async function getJson(path, params) {
  const controller = new AbortController();
  const timeout = setTimeout(() => controller.abort(), REQUEST_TIMEOUT_MS);
  try {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const headers = token ? {Authorization: `Bearer ${token}`} : {};
    const response = await fetch(`${path}?${new URLSearchParams(params)}`, {signal: controller.signal, cache: "no-store", headers});
    const body = await response.json().catch(() => ({}));
    if (response.ok) return body;
    if (response.status === 401) {
      // Only the token this request sent: one entered while it was on its way stays.
      if (sessionStorage.getItem(TOKEN_KEY) === token) sessionStorage.removeItem(TOKEN_KEY);
      throw new NeedsToken(token ? "The API refused that token; enter the API's token (API_TOKEN)."
                                 : "This API needs a token; enter it (API_TOKEN).");
    }
    const said = `HTTP ${response.status}${body.error ? ": " + body.error : ""}`;
    throw new Problem(response.status === 503 ? `The database is not answering (${said}).`
                                              : `The API refused the request (${said}).`);
  } catch (error) {
    if (error instanceof Problem) throw error;
    throw new Problem(error.name === "AbortError" ? `The API did not answer within ${REQUEST_TIMEOUT_MS / 1000} s.`
                                                  : `The API does not answer at ${location.origin}.`);
  } finally {
    clearTimeout(timeout);
  }
}

async function refresh() {
  clearTimeout(timer);
  const mine = ++generation;  // a refresh started later (a new range) wins over this one
  chart.setAttribute("aria-busy", "true");
  try {
    const {start, end, step} = view();
    const bounds = {start: iso(start), end: iso(end)};
    const [series, totals] = await Promise.all([
      getJson("status-series", {...bounds, step}), getJson("status-count", bounds)]);
    if (mine !== generation) return;
    draw(series, totals);
    $("token-form").hidden = true;  // answered: with this token, or by an API that no longer asks for one
    showProblem(null);
  } catch (error) {
    if (mine !== generation) return;
    if (error instanceof NeedsToken) {  // no retry until a token is given
      $("token-form").hidden = false;
      $("token").focus();
      showProblem(error.message, false);
      return;
    }
    if (!(error instanceof Problem)) console.error(error);
    showProblem(error instanceof Problem ? error.message : `The page failed: ${error}.`);
  } finally {
    if (mine === generation) {
      chart.setAttribute("aria-busy", "false");
      if (!paused && $("token-form").hidden) timer = setTimeout(refresh, REFRESH_MS);
    }
  }
}

function draw(series, totals) {
  const statuses = Object.keys(totals.counts);
  // The table first: the chart then sizes itself to the room the table leaves it.
  const rows = statuses.map((status, index) => {
    const row = document.createElement("tr");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = COLOURS[index % COLOURS.length];
    row.insertCell().append(swatch, `status ${status}`);
    Object.assign(row.insertCell(), {className: "count", textContent: format(totals.counts[status])}).dataset.status = status;
    return row;
  });
  $("totals").tBodies[0].replaceChildren(...rows);
  $("total").textContent = format(totals.total);
  Object.assign($("totals").dataset, {start: totals.start, end: totals.end});

  const x = series.buckets.map((bucket) => plotlyTime(bucket.start));
  // Each bar spans its bucket exactly, so the clipped first and last buckets are narrower.
  const width = series.buckets.map((bucket) => Date.parse(bucket.end) - Date.parse(bucket.start));
  const traces = statuses.map((status, index) => ({
    type: "bar", name: `status ${status}`, x, width, offset: 0,
    y: series.buckets.map((bucket) => bucket.counts[status]),
    marker: {color: COLOURS[index % COLOURS.length], line: {width: 0}},
    hovertemplate: "%{y}",
  }));
  Plotly.react(chart, traces, {
    barmode: "stack", hovermode: "x unified", margin: {t: 30, r: 10, b: 50, l: 60},
    uirevision: [$("range").value, $("custom-start").value, $("custom-end").value].join(),  // keeps a zoom
    legend: {orientation: "h", x: 0, y: 1, yanchor: "bottom", traceorder: "normal"},
    xaxis: {type: "date", range: [plotlyTime(series.start), plotlyTime(series.end)], title: {text: "UTC"}},
    // Whole messages: below six a bar, plotly.js would tick at halves.
    yaxis: {title: {text: `messages per ${series.step}`}, rangemode: "tozero", fixedrange: true,
            dtick: Math.max(0, ...series.buckets.map((bucket) => bucket.total)) < 6 ? 1 : undefined},
  }, {displayModeBar: false, responsive: true});  // zoom by dragging, double-click to reset
  Object.assign(chart.dataset, {start: series.start, end: series.end, step: series.step});

  updatedAt = new Date().toISOString().slice(11, 19);
  shown = `from ${shortTime(totals.start)}\nto ${shortTime(totals.end)} UTC\none bar per ${series.step}`;
  document.body.dataset.refreshes = Number(document.body.dataset.refreshes || 0) + 1;
  describe();
}

function describe() {
  $("shown").textContent = `${shown}\nupdated at ${updatedAt}${paused ? ", paused" : ""}`;
}

function showProblem(text, retrying = true) {
  const message = $("message");
  message.hidden = !text;
  if (!text) return document.body.classList.remove("stale");
  const retry = paused || !retrying ? "" : ` Trying again every ${REFRESH_MS / 1000} s.`;
  message.textContent = text + retry + (updatedAt ? ` The figures below are from ${updatedAt} UTC.` : "");
  document.body.classList.toggle("stale", updatedAt !== null);
}

$("range").addEventListener("change", () => {
  const custom = $("range").value === "custom";
  $("custom").hidden = !custom;
  if (custom && !$("custom-start").value) {  // start from what is shown
    const end = chart.dataset.end ? Date.parse(chart.dataset.end) : Date.now();
    $("custom-start").value = inputValue(chart.dataset.start ? Date.parse(chart.dataset.start) : end - 3600000);
    $("custom-end").value = inputValue(end);
  }
  refresh();
});
$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  if (!/^[A-Za-z0-9._~+\/-]+=*$/.test(token)) {  // RFC 6750's b64token, as API_TOKEN must be
    showProblem("That is not a token: API_TOKEN holds letters, digits and -._~+/ only, = at the end.", false);
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token").value = "";
  $("token-form").hidden = true;
  refresh();
});
$("custom-start").addEventListener("change", refresh);
$("custom-end").addEventListener("change", refresh);
$("pause").addEventListener("click", () => {
  paused = !paused;
  $("pause").textContent = paused ? "Resume" : "Pause";
  $("pause").setAttribute("aria-pressed", String(paused));
  if (updatedAt) describe();
  if (paused) clearTimeout(timer);
  else refresh();
});
refresh();
