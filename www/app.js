// The demo Privacy Settings page: the story's "Data export" card on top of
// the handover package (pkg/) and handover-server (demo mode).
import init, { exportData, decryptExport, ExportError } from "/pkg/handover.js";

const $ = (id) => document.getElementById(id);
const LABELS = { user_profile: "Your profile", payment_history: "Payments", membership_data: "Memberships",
  recovery_cases: "Recovery cases", consent_data: "Consent settings" };
let config;
let controller = null;
// The data types the server offers this user (from /api/data/summary).
let offered = null;

async function api(path) {
  const r = await fetch(path, { headers: { Authorization: `Bearer ${config.token}`, "X-Company-ID": config.companyId } });
  const body = await r.json();
  if (!r.ok) throw new ExportError(body.error?.code ?? "HTTP_ERROR", body.error?.error ?? `HTTP ${r.status}`, { status: r.status });
  return body.data;
}

function say(text, kind = "") {
  $("status").textContent = text;
  $("status").className = kind;
}

function timeIn(seconds) {
  const at = new Date(Date.now() + seconds * 1000);
  const time = at.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  return at.toDateString() === new Date().toDateString() ? time : `${time} tomorrow`;
}

function explain(err) {
  switch (err?.code) {
    case "RATE_LIMIT_EXCEEDED":
      return `You have requested several exports recently. You can request another export at ${timeIn(err.retryAfter ?? 60)}.`;
    case "NETWORK_ERROR":
      return "We couldn't reach the server. Check your connection and try again.";
    case "UNAUTHORIZED":
      return "Your session has expired. Please sign in again.";
    case "ABORTED":
      return "Export cancelled. Nothing was downloaded.";
    case "DATE_RANGE_INVALID":
      return "Please check the date range: the start must be before the end.";
    case "FILE_TOO_LARGE":
      return "This export would be too large to prepare in one go. Choose a shorter date range and export in parts.";
    case "DECRYPTION_FAILED":
      return "This link does not open the copy: it may be incomplete, or the copy was altered. Check that you copied the whole link.";
    case "INVALID_KEY":
      return "This link is incomplete: its key is missing or damaged. Copy the whole link and try again.";
    case "EXPORT_NOT_FOUND":
      return "This export no longer exists: it expired or was deleted.";
    case "RECORD_COUNT_MISMATCH":
      return "Your data changed while it was being exported, so this file would not match it. Please export again.";
    case "QUOTA_EXCEEDED":
      return `You have exported a lot of data today. You can export again at ${timeIn(err.retryAfter ?? 3600)}.`;
    default:
      return `The export failed: ${err?.message ?? err}`;
  }
}

async function loadSummary() {
  const list = $("included");
  try {
    const s = await api("/api/data/summary");
    offered = s.data_types.map((t) => t.data_type);
    list.replaceChildren(...s.data_types.map((t) => {
      const li = document.createElement("li");
      li.dataset.type = t.data_type;
      const n = document.createElement("strong");
      n.textContent = t.records.toLocaleString();
      li.append(n, ` ${LABELS[t.data_type] ?? t.description}`);
      return li;
    }));
  } catch (e) {
    list.replaceChildren(Object.assign(document.createElement("li"), { textContent: explain(e) }));
  } finally {
    list.setAttribute("aria-busy", "false");
  }
}

async function loadRecent() {
  const body = $("recent").tBodies[0];
  try {
    const { requests } = await api("/api/data/export?limit=5");
    if (!requests.length) {
      body.innerHTML = '<tr><td colspan="4" class="muted">No exports yet.</td></tr>';
      return;
    }
    body.replaceChildren(...requests.map((r) => {
      const tr = document.createElement("tr");
      tr.dataset.requestId = r.request_id;
      const cells = [new Date(r.created_at).toLocaleString(), r.export_format.toUpperCase(),
        r.record_count == null ? "–" : r.record_count.toLocaleString()];
      for (const c of cells) tr.append(Object.assign(document.createElement("td"), { textContent: String(c) }));
      // A request the user cancelled is failed on the server, with that reason.
      const shown = r.status === "failed" && r.failure_reason === "cancelled" ? "cancelled"
        : r.outcome === "partial" ? "partial" : r.status;
      const badge = Object.assign(document.createElement("span"), { className: `badge ${shown}`, textContent: shown });
      const td = document.createElement("td");
      td.append(badge);
      if (r.download_url) {
        // A file the server keeps (a server build), or the encrypted copy of
        // a browser export (its key is in the link, remembered in this browser).
        const again = Object.assign(document.createElement("button"), { type: "button", className: "link", textContent: "Download" });
        const open = r.delivery === "client"
          ? () => downloadCopy(r.request_id, localStorage.getItem(`handover-copy:${r.request_id}`))
          : () => downloadAgain(r);
        again.addEventListener("click", () => open().catch((e) => say(explain(e), "error")));
        td.append(" ", again);
      }
      tr.append(td);
      return tr;
    }));
  } catch (e) {
    body.innerHTML = "";
    body.append(Object.assign(document.createElement("tr"), { innerHTML: `<td colspan="4"></td>` }));
    body.querySelector("td").textContent = explain(e);
  }
}

async function downloadAgain(r) {
  const res = await fetch(r.download_url, { headers: { Authorization: `Bearer ${config.token}`, "X-Company-ID": config.companyId } });
  if (!res.ok) {
    const body = await res.json().catch(() => ({}));
    throw new ExportError(body.error?.code ?? "HTTP_ERROR", body.error?.error ?? `HTTP ${res.status}`, { status: res.status });
  }
  save(await res.blob(), `${r.request_id}.${r.export_format}`);
}

function save(blob, filename) {
  const url = URL.createObjectURL(blob);
  const a = Object.assign(document.createElement("a"), { href: url, download: filename });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

const TYPES = { json: "application/json", csv: "text/csv",
  xlsx: "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet" };

// The encrypted copy of a browser export: fetched as ciphertext, decrypted here.
async function downloadCopy(id, key) {
  if (!key) {
    say("Open the link you saved when you made this export to download its copy: only that link holds the key.", "error");
    return;
  }
  const details = await api(`/api/data/export/${encodeURIComponent(id)}`);
  const res = await fetch(`/api/data/export/${encodeURIComponent(id)}/download`, { headers: { Authorization: `Bearer ${config.token}`, "X-Company-ID": config.companyId } });
  if (!res.ok) {
    const body = await res.json().catch(() => ({}));
    throw new ExportError(body.error?.code ?? "HTTP_ERROR", body.error?.error ?? `HTTP ${res.status}`, { status: res.status });
  }
  const file = await decryptExport(await res.blob(), key, { type: TYPES[details.export_format] });
  save(file, `${id}.${details.export_format}`);
  say(`Your saved export is downloading: ${id}.${details.export_format}.`, "ok");
}

/** `#copy=<id>&key=<key>`, as exportData's keepCopy links end. */
function copyFromLink() {
  const params = new URLSearchParams(location.hash.slice(1));
  const id = params.get("copy");
  if (!id) return null;
  // Out of the address bar (and this tab's history) once read.
  history.replaceState(null, "", location.pathname + location.search);
  return { id, key: params.get("key") };
}

async function showCopy(result) {
  // The demo remembers the key in this browser, so that "Recent exports"
  // can download the copy again; an app that wants the key to live only in
  // the link the user keeps would not.
  localStorage.setItem(`handover-copy:${result.requestId}`, result.copy.key);
  $("copy-link").value = result.copy.link;
  $("copy-box").hidden = false;
  const details = await api(`/api/data/export/${encodeURIComponent(result.requestId)}`).catch(() => null);
  $("copy-expires").textContent = details ? new Date(details.expires_at).toLocaleDateString() : "it expires";
}

// Progress is drawn at most every DRAW_EVERY_MS, at a frame: events can come
// many to a frame (one per page of records) and each frame costs the page's
// thread layout and paint; ten a second still reads as live.
const DRAW_EVERY_MS = 100;
const counts = new Intl.NumberFormat();
// The latest progress not yet drawn, and the timer of the draw due.
let undrawn = null;
let drawTimer = null;
let drawnAt = 0;

function showProgress(p) {
  undrawn = p;
  if (drawTimer !== null) return;
  drawTimer = setTimeout(() => requestAnimationFrame(drawProgress), Math.max(0, drawnAt + DRAW_EVERY_MS - performance.now()));
}

// At a frame, or at once (the start and the end): either way the draw due
// is done, so its timer goes.
function drawProgress() {
  clearTimeout(drawTimer);
  drawTimer = null;
  const p = undrawn;
  if (p === null) return;
  undrawn = null;
  drawnAt = performance.now();
  $("progress").value = p.percentage;
  $("progress-pct").textContent = `${p.percentage}%`;
  $("progress-type").textContent = p.currentType ? `${LABELS[p.currentType] ?? p.currentType} · ${counts.format(p.recordsProcessed)} of ${counts.format(p.totalRecords)} records` : "finishing";
  $("progress-label").textContent = p.percentage === 100 ? "Export ready" : "Preparing export…";
}

async function runExport(event) {
  event.preventDefault();
  const form = $("export-form");
  const format = form.elements.format.value;
  const start = $("start").value;
  const end = $("end").value;
  const dateRange = start || end ? { start: start ? `${start}T00:00:00Z` : null, end: end ? `${end}T23:59:59.999Z` : null } : undefined;
  controller = new AbortController();
  $("export-button").disabled = true;
  $("export-button").textContent = "Preparing export…";
  $("cancel-button").hidden = false;
  $("progress-box").hidden = false;
  $("copy-box").hidden = true;
  showProgress({ percentage: 0, currentType: null, recordsProcessed: 0, totalRecords: 0 });
  drawProgress();
  $("progress-type").textContent = "starting";
  say("");
  try {
    // The export runs in a worker: this page only receives progress.
    const result = await exportData({
      baseUrl: location.origin, token: config.token, companyId: config.companyId, format,
      // Everything the server offers (exportData asks it when the list is unknown).
      ...(offered?.length ? { dataTypes: offered } : {}), dateRange, metadata: { purpose: "gdpr_request", source: "privacy-settings" },
      onProgress: showProgress, signal: controller.signal, keepCopy: $("keep-copy").checked,
    });
    drawProgress();
    const done = `Your download has started: ${result.filename} (${result.recordCount.toLocaleString()} records, ${(result.byteSize / 1024).toFixed(1)} KB).`;
    if (result.copy) await showCopy(result);
    if (result.copyError) say(`${done} The encrypted copy could not be kept: ${explain(result.copyError)}`, "error");
    else say(done, "ok");
  } catch (err) {
    $("progress-box").hidden = true;
    say(explain(err), "error");
  } finally {
    controller = null;
    $("export-button").disabled = false;
    $("export-button").textContent = "Export data";
    $("cancel-button").hidden = true;
    loadRecent();
  }
}

async function main() {
  await init();
  config = await (await fetch("/demo-config.json")).json();
  $("export-form").addEventListener("submit", runExport);
  $("cancel-button").addEventListener("click", () => controller?.abort());
  $("copy-link-button").addEventListener("click", () => navigator.clipboard?.writeText($("copy-link").value));
  const linked = copyFromLink();
  if (linked) {
    $("open-copy").hidden = false;
    $("open-copy-button").addEventListener("click", () => downloadCopy(linked.id, linked.key).catch((e) => say(explain(e), "error")));
  }
  await Promise.all([loadSummary(), loadRecent()]);
  document.body.dataset.ready = "true";
}

main().catch((e) => say(explain(e), "error"));
