// Browser benchmarks of handover, as markdown tables, in Debian's Chromium
// (a fresh browser with a real profile per measured run, so peak memory is
// that run's alone and the Origin Private File System is on disk, as for a
// user). Every figure stands beside an anchor measured in the same run:
// `sqlite3 -csv` of the same query, rust_xlsxwriter alone natively, the JS
// libraries people use, a hand-written fetch loop, the time the compressed
// bytes alone need on the emulated link.
//
// BENCH_RECORDS (default 1000000) sizes the demo user; BENCH_SECTIONS picks
// sections (default "export,link,contenders,loops,longtask,trace,huge";
// trace: the demo page's main-thread tasks, their CPU beside their wall time);
// BENCH_HUGE (default 10000000) sizes the huge CSV export.
import { execFileSync } from "node:child_process";
import { readFileSync, readdirSync, writeFileSync, mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { request } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { launchWithProfile } from "../tests/js/support/chromium.mjs";
import { serveStatic } from "../tests/js/support/static-server.mjs";
import { startServer, ROOT } from "../tests/js/support/server.mjs";

const BIN = join(ROOT, "target/release/handover-server");
const RECORDS = Number(process.env.BENCH_RECORDS ?? 1_000_000);
const HUGE = Number(process.env.BENCH_HUGE ?? 10_000_000);
const SECTIONS = new Set((process.env.BENCH_SECTIONS ?? "export,link,contenders,loops,longtask,trace,huge").split(","));
const dir = mkdtempSync(join(tmpdir(), "handover-bench-"));
const QUERY = "SELECT id, user_id, membership_id, amount_cents, currency, status, payment_method, failure_reason, created_at " +
  "FROM demo_payments WHERE user_id = 'user_456' AND company_id = 'company_123' ORDER BY id";

function database(name, records) {
  const env = { DATABASE_URL: `sqlite://${join(dir, name)}`, HANDOVER_DATA_DIR: join(dir, `${name}-data`), HANDOVER_MASTER_KEY: "22".repeat(32) };
  const cli = (args) => execFileSync(BIN, args, { env: { ...process.env, ...env }, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] }).trim();
  cli(["demo-data", "--users", "0", "--records", String(records)]);
  return { dir, env, file: join(dir, name), cli, token: () => cli(["token", "create", "--user", "user_456", "--company", "company_123"]) };
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
function timed(fn, repeat = 3) {
  return median(Array.from({ length: repeat }, () => { const t0 = process.hrtime.bigint(); fn(); return Number(process.hrtime.bigint() - t0) / 1e9; }));
}

/** The Chromium renderer processes (pages and their workers). */
function renderers() {
  return readdirSync("/proc").filter((p) => /^\d+$/.test(p)).filter((pid) => {
    try {
      const cmd = readFileSync(`/proc/${pid}/cmdline`, "utf8");
      return cmd.includes("chromium") && cmd.includes("--type=renderer");
    } catch { return false; }
  });
}
const statusKb = (pid, field) => Number(new RegExp(`${field}:\\s+(\\d+)`).exec(readFileSync(`/proc/${pid}/status`, "utf8"))?.[1] ?? 0);
const peakMb = () => Math.max(0, ...renderers().map((p) => { try { return statusKb(p, "VmHWM") / 1024; } catch { return 0; } }));
/** Each renderer's resident memory now, by pid. */
const rssNow = () => Object.fromEntries(renderers().map((p) => { try { return [p, statusKb(p, "VmRSS") / 1024]; } catch { return [p, 0]; } }));
/** The most any renderer grew past `base` (its RSS before), at its peak. */
const grownMb = (base) => Math.max(0, ...renderers().map((p) => { try { return statusKb(p, "VmHWM") / 1024 - (base[p] ?? 0); } catch { return 0; } }));
/** Starts a new peak: the kernel resets VmHWM to the current RSS. */
function resetPeak() {
  for (const p of renderers()) { try { writeFileSync(`/proc/${p}/clear_refs`, "5"); } catch { /* gone */ } }
}

const mb = (b) => (b / 1048576).toFixed(1);
const x = (a, b) => (a / b).toFixed(2);

async function withPage(web, fn) {
  const browser = await launchWithProfile();
  try {
    const page = await browser.newPage();
    await page.goto(`${web.url}/tests/js/support/blank.html`);
    return await fn(page);
  } finally {
    await browser.close();
  }
}

/** The bench user makes far more exports than a user may in an hour. */
function resetLimits(db) {
  // The server checkpoints its write-ahead log every second: wait for its
  // lock (up to 10 s) instead of failing at once with SQLITE_BUSY.
  execFileSync("sqlite3", ["-cmd", ".timeout 10000", db.file, "DELETE FROM rate_events; DELETE FROM export_requests;"], { stdio: "ignore" });
}

/** exportData in the page; returns its figures, and the renderer's peak memory. */
async function exportIn(page, { db, baseUrl, format, opts = {} }) {
  resetLimits(db);
  const token = db.token();
  const r = await page.evaluate(async ({ baseUrl, token, format, opts }) => {
    const { default: init, exportData } = await import("/pkg/handover.js");
    await init();
    const t0 = performance.now();
    const r = await exportData({ baseUrl, token, companyId: "company_123", format, dataTypes: ["payment_history"], download: false, pageSize: 5000, ...opts });
    const s = (performance.now() - t0) / 1000;
    const out = { s, records: r.recordCount, bytes: r.byteSize, stats: r.stats };
    await r.release();
    return out;
  }, { baseUrl, token, format, opts });
  return { ...r, peak: peakMb() };
}

/** An export's `stats.timing` in seconds, the two workers' stages apart. */
function timingOf(stats) {
  const t = stats.timing;
  const s = (keys) => keys.map((k) => ((t[k] ?? 0) / 1000).toFixed(1)).join(" / ");
  return `${s(["waitMs", "decodeMs", "writeMs", "handOverMs"])} · ${s(["packMs", "hashMs", "storeMs"])}`;
}

/** A fresh browser on the demo page, ready; resolves to `fn(page, browser)`. */
async function onDemoPage(demo, fn) {
  resetLimits(db);
  const browser = await launchWithProfile({ acceptDownloads: true });
  try {
    const page = await browser.newPage();
    await page.goto(demo.url);
    await page.waitForSelector("body[data-ready=true]", { timeout: 60000 });
    return await fn(page, browser);
  } finally {
    await browser.close();
  }
}

/** Exports `format` with the demo page's button, until the page says it is done. */
async function clickExport(page, format) {
  await page.check(`input[name=format][value=${format}]`);
  await Promise.all([page.waitForEvent("download", { timeout: 600000 }), page.click("#export-button")]);
  await page.waitForFunction(() => document.querySelector("#status").classList.contains("ok"), null, { timeout: 60000 });
}

const TRACE_CATEGORIES = ["toplevel", "devtools.timeline", "disabled-by-default-devtools.timeline", "v8.execute", "blink"];

/** The page's main-thread tasks in a Chromium trace, longest first (wall and CPU ms). */
function mainThreadTasks(events) {
  const names = new Map();
  const count = new Map();
  for (const e of events) {
    const key = `${e.pid}:${e.tid}`;
    if (e.ph === "M" && e.name === "thread_name") names.set(key, e.args.name);
    count.set(key, (count.get(key) ?? 0) + 1);
  }
  // The page's renderer is the busiest thread of that name.
  const main = [...names].filter(([, n]) => n === "CrRendererMain").map(([k]) => k)
    .sort((a, b) => count.get(b) - count.get(a))[0];
  const all = events.filter((e) => `${e.pid}:${e.tid}` === main && e.ph === "X" && e.name === "ThreadControllerImpl::RunTask")
    .sort((a, b) => a.ts - b.ts);
  // A task can run a nested one of the same name: count the outer only.
  const outer = [];
  for (const e of all) if (!outer.length || e.ts >= outer.at(-1).ts + outer.at(-1).dur) outer.push(e);
  return outer.map((e) => ({ wall: e.dur / 1000, cpu: (e.tdur ?? 0) / 1000, source: e.args?.src_func ?? "?" }))
    .sort((a, b) => b.wall - a.wall);
}

const web = await serveStatic(ROOT);
const db = database("bench.db", RECORDS);
const server = await startServer(db, { extraEnv: { HANDOVER_LOG: "info" }, bin: BIN });
const payments = Number(execFileSync("sqlite3", [db.file, "SELECT COUNT(*) FROM demo_payments WHERE user_id='user_456' AND company_id='company_123'"], { encoding: "utf8" }));
const sqlite = timed(() => execFileSync("sqlite3", ["-csv", "-header", db.file, QUERY], { maxBuffer: 1 << 30, stdio: ["ignore", "ignore", "inherit"] }));
console.log(`One user with ${payments.toLocaleString("en-US")} payments; anchor \`sqlite3 -csv\` of the same query: ${sqlite.toFixed(2)} s (median of 3).\n`);

try {
  if (SECTIONS.has("export")) {
    const xs = [0, 1, 2].map(() => Number(execFileSync(join(ROOT, "target/release/examples/anchor_xlsx"), [db.file, "user_456", "company_123", join(dir, "anchor.xlsx")], { encoding: "utf8" }).split(" ")[0]));
    const xlsxAnchor = median(xs);
    console.log("### exportData: every payment, in Chromium, against a release server\n");
    console.log(`pageSize 5000, retries armed, checksum and \`complete\` included; the default worker and OPFS file. rust_xlsxwriter alone (constant memory) writes the same rows in ${xlsxAnchor.toFixed(2)} s.\n`);
    console.log("Where the time went: the export's worker (waiting for the network, decoding, writing rows, handing chunks over and waiting while the packing worker is behind), then the packing worker (assembling the zip, SHA-256, storing).\n");
    console.log("| format | records | MB | s | × sqlite3 | × rust_xlsxwriter | peak renderer MB | wasm MB | wait / decode / write / hand-over · pack / hash / store s |");
    console.log("|---|--:|--:|--:|--:|--:|--:|--:|---|");
    for (const format of ["csv", "json", "xlsx"]) {
      const r = await withPage(web, (page) => exportIn(page, { db, baseUrl: server.url, format }));
      const split = timingOf(r.stats);
      console.log(`| ${format} | ${r.records} | ${mb(r.bytes)} | ${r.s.toFixed(1)} | ${x(r.s, sqlite)} | ${format === "xlsx" ? x(r.s, xlsxAnchor) : ""} | ${r.peak.toFixed(0)} | ${mb(r.stats.wasmMemoryBytes)} | ${split} |`);
    }
    console.log();
  }

  if (SECTIONS.has("link")) {
    // Bytes on the wire of the CSV export's stream, as Chromium asks for it.
    resetLimits(db);
    const created = JSON.parse(await httpJson(server.url, "/api/data/export", db.token(), { export_format: "csv", data_types: ["payment_history"], delivery: "client" }));
    const wire = await wireBytes(server.url, `/api/data/export/${created.data.request_id}/records/payment_history/stream?limit=5000`, created.token);
    // Served by the page's own origin (a fetch to another origin would need CORS).
    mkdirSync(join(ROOT, "test-artifacts"), { recursive: true });
    writeFileSync(join(ROOT, "test-artifacts", "wire.bin"), Buffer.alloc(wire, 1));
    const conditions = { offline: false, latency: 40, downloadThroughput: 50e6 / 8, uploadThroughput: 10e6 / 8 };
    console.log("### The same export through an emulated link: 50 Mbit/s down, 40 ms latency\n");
    console.log(`Chromium's network emulation (CDP, it throttles the worker's requests too). The anchor is a fetch of as many bytes as the export's compressed stream (${mb(wire)} MB) through the same link.\n`);
    console.log("| format | s | bytes on the wire MB | anchor: the bytes alone, s | × anchor | wait / decode / write / hand-over · pack / hash / store s |");
    console.log("|---|--:|--:|--:|--:|---|");
    for (const format of ["csv", "json", "xlsx"]) {
      const r = await withPage(web, async (page) => {
        const cdp = await page.context().newCDPSession(page);
        await cdp.send("Network.enable");
        await cdp.send("Network.emulateNetworkConditions", conditions);
        const anchor = await page.evaluate(async (url) => {
          const w = new Worker(URL.createObjectURL(new Blob([`onmessage = async (e) => { try { const t0 = performance.now(); await (await fetch(e.data, { cache: "no-store" })).arrayBuffer(); postMessage(performance.now() - t0); } catch (err) { postMessage(String(err)); } }`], { type: "text/javascript" })));
          return new Promise((ok, fail) => { w.onmessage = (e) => (typeof e.data === "number" ? ok(e.data / 1000) : fail(new Error(e.data))); w.postMessage(url); });
        }, `${web.url}/test-artifacts/wire.bin`);
        const run = await exportIn(page, { db, baseUrl: server.url, format });
        return { ...run, anchor };
      });
      console.log(`| ${format} | ${r.s.toFixed(1)} | ${mb(wire)} | ${r.anchor.toFixed(1)} | ${x(r.s, r.anchor)} | ${timingOf(r.stats)} |`);
    }
    console.log();
  }

  if (SECTIONS.has("contenders")) {
    console.log("### formatRecords against the libraries people use, on records the page holds\n");
    console.log("Each cell: seconds, then the renderer's peak memory beyond the records themselves (MB). Every contender ends with a Blob, as an app that offers the file for download does; formatRecords builds it as it goes (`output: \"blob\"`).\n");
    console.log("| records | format | formatRecords | contender | contender s, MB | × time | × memory |");
    console.log("|--:|---|---|---|---|--:|--:|");
    for (const n of (process.env.BENCH_SIZES ?? "100000,1000000").split(",").map(Number)) {
      for (const [format, contender] of [["json", "JSON.stringify"], ["csv", "PapaParse"], ["xlsx", "wasm-xlsxwriter"], ["xlsx", "SheetJS"]]) {
        const ours = await withPage(web, (page) => contend(page, n, "handover", format));
        const theirs = await withPage(web, (page) => contend(page, n, contender, format));
        const cell = (r) => (r.failed ? `fails: ${r.failed}` : `${r.s.toFixed(2)} s, ${r.mb.toFixed(0)}`);
        const ratio = (a, b) => (a === undefined || b === undefined ? "" : x(a, Math.max(b, 1e-9)));
        console.log(`| ${n.toLocaleString("en-US")} | ${format} | ${cell(ours)} | ${contender} | ${cell(theirs)} | ${ratio(ours.s, theirs.s)} | ${ratio(ours.mb, theirs.mb)} |`);
      }
    }
    console.log();
  }

  if (SECTIONS.has("loops")) {
    console.log("### exportData against the fetch loop app developers write today\n");
    console.log("The loop: create the export, fetch every page (5000 records, JSON), keep the records, then PapaParse / JSON.stringify / SheetJS, and a Blob. Seconds, and the renderer's peak memory (MB).\n");
    console.log("| format | exportData | hand-written loop | × time | × memory |");
    console.log("|---|--:|--:|--:|--:|");
    for (const [format, lib] of [["csv", "PapaParse"], ["json", "JSON.stringify"], ["xlsx", "SheetJS"]]) {
      const ours = await withPage(web, async (page) => { const r = await exportIn(page, { db, baseUrl: server.url, format }); return { s: r.s, mb: r.peak }; });
      // The loop can fail outright at this size (SheetJS: RangeError); that is a result too.
      const theirs = await withPage(web, async (page) => {
        resetLimits(db);
        try {
          const s = await handWritten(page, server.url, db.token(), format, lib);
          return { s, mb: peakMb() };
        } catch (e) {
          return { failed: String(e.message || e).split("\n")[0].replace(/^page\.evaluate: /, ""), mb: peakMb() };
        }
      });
      const theirsCell = theirs.failed ? `${lib}: fails (${theirs.failed}) at ${theirs.mb.toFixed(0)} MB` : `${lib}: ${theirs.s.toFixed(1)} s, ${theirs.mb.toFixed(0)} MB`;
      console.log(`| ${format} | ${ours.s.toFixed(1)} s, ${ours.mb.toFixed(0)} MB | ${theirsCell} | ${theirs.failed ? "–" : x(ours.s, theirs.s)} | ${x(ours.mb, theirs.mb)} |`);
    }
    console.log();
  }

  if (SECTIONS.has("longtask") || SECTIONS.has("trace")) {
    const demo = await startServer(db, { extraEnv: { HANDOVER_LOG: "info" }, bin: BIN, args: ["--demo", "--www-dir", join(ROOT, "www"), "--pkg-dir", join(ROOT, "pkg")] });
    try {
      if (SECTIONS.has("longtask")) {
        console.log("### The demo page's main thread during an export\n");
        console.log("| format | longest main-thread task ms | long tasks (> 50 ms) |");
        console.log("|---|--:|--:|");
        for (const format of ["csv", "xlsx"]) {
          const r = await onDemoPage(demo, async (page) => {
            await page.evaluate(() => {
              window.__long = [];
              new PerformanceObserver((l) => { for (const e of l.getEntries()) window.__long.push(e.duration); }).observe({ type: "longtask" });
            });
            await clickExport(page, format);
            return await page.evaluate(() => window.__long);
          });
          console.log(`| ${format} | ${r.length ? Math.max(...r).toFixed(0) : "none over 50"} | ${r.length} |`);
        }
        console.log();
      }
      if (SECTIONS.has("trace")) {
        // Traced apart from the long-task runs: tracing costs the renderer time.
        console.log("### The demo page's main thread during an export, traced\n");
        console.log("Tasks of the page's thread (Chromium trace); a task with far less CPU than wall time was waiting for a core.\n");
        console.log("| format | tasks | CPU ms | longest tasks: wall / CPU ms (what) |");
        console.log("|---|--:|--:|---|");
        for (const format of ["csv", "xlsx"]) {
          const tasks = await onDemoPage(demo, async (page, browser) => {
            const cdp = await browser.newCDPSession(page);
            const events = [];
            cdp.on("Tracing.dataCollected", (e) => events.push(...e.value));
            const complete = new Promise((ok) => cdp.once("Tracing.tracingComplete", ok));
            await cdp.send("Tracing.start", { transferMode: "ReportEvents", traceConfig: { includedCategories: TRACE_CATEGORIES } });
            await clickExport(page, format);
            await cdp.send("Tracing.end");
            await complete;
            return mainThreadTasks(events);
          });
          const cpu = tasks.reduce((sum, t) => sum + t.cpu, 0);
          const longest = tasks.slice(0, 3).map((t) => `${t.wall.toFixed(1)} / ${t.cpu.toFixed(1)} (${t.source})`).join(", ");
          console.log(`| ${format} | ${tasks.length} | ${cpu.toFixed(0)} | ${longest} |`);
        }
        console.log();
      }
    } finally {
      await demo.stop();
    }
  }

  if (SECTIONS.has("huge")) {
    const big = database("huge.db", HUGE);
    const bigServer = await startServer(big, { extraEnv: { HANDOVER_LOG: "info", HANDOVER_MAX_EXPORT_MB: "100000" }, bin: BIN });
    try {
      const n = Number(execFileSync("sqlite3", [big.file, "SELECT COUNT(*) FROM demo_payments WHERE user_id='user_456' AND company_id='company_123'"], { encoding: "utf8" }));
      const r = await withPage(web, (page) => exportIn(page, { db: big, baseUrl: bigServer.url, format: "csv" }));
      const peak = r.peak;
      console.log(`### ${n.toLocaleString("en-US")} payments as CSV in Chromium\n`);
      console.log("| records | GB | s | records/s | peak renderer MB | wasm MB | storage |");
      console.log("|--:|--:|--:|--:|--:|--:|---|");
      console.log(`| ${r.records} | ${(r.bytes / 2 ** 30).toFixed(2)} | ${r.s.toFixed(1)} | ${Math.round(r.records / r.s)} | ${peak.toFixed(0)} | ${mb(r.stats.wasmMemoryBytes)} | ${r.stats.storage} |`);
      console.log(peak <= 400 ? "\nPeak renderer memory stayed within 400 MB." : `\nFAILED: peak renderer memory ${peak.toFixed(0)} MB is over 400 MB.`);
      if (peak > 400) process.exitCode = 1;
    } finally {
      await bigServer.stop();
    }
  }
} finally {
  await server.stop();
  await web.close();
  rmSync(dir, { recursive: true, force: true });
}

/** POSTs JSON with a bearer token; resolves to the body text and remembers the token. */
function httpJson(base, path, token, body) {
  return new Promise((resolve, reject) => {
    const req = request(`${base}${path}`, { method: "POST", headers: { authorization: `Bearer ${token}`, "x-company-id": "company_123", "content-type": "application/json" } }, (res) => {
      let text = "";
      res.on("data", (c) => { text += c; });
      res.on("end", () => { const v = JSON.parse(text); v.token = token; resolve(JSON.stringify(v)); });
    });
    req.on("error", reject);
    req.end(JSON.stringify(body));
  });
}

/** Bytes of a body as received with Chromium's Accept-Encoding. */
function wireBytes(base, path, token) {
  return new Promise((resolve, reject) => {
    request(`${base}${path}`, { headers: { authorization: `Bearer ${token}`, "x-company-id": "company_123", "accept-encoding": "gzip, deflate, br, zstd" } }, (res) => {
      let n = 0;
      res.on("data", (c) => { n += c.length; });
      res.on("end", () => resolve(n));
    }).on("error", reject).end();
  });
}

/** One contender on n generated records: seconds and peak MB beyond the records. */
async function contend(page, n, who, format) {
  if (who === "PapaParse") await page.addScriptTag({ path: join(ROOT, "node_modules/papaparse/papaparse.min.js") });
  if (who === "SheetJS") await page.addScriptTag({ path: join(ROOT, "node_modules/xlsx/dist/xlsx.full.min.js") });
  await page.evaluate(async (n) => {
    const pick = (a, i) => a[i % a.length];
    window.records = Array.from({ length: n }, (_, i) => ({
      id: `payment_${String(i).padStart(9, "0")}`, user_id: "user_456", membership_id: `membership_${i % 7}`,
      amount_cents: 499 + (i % 20000), currency: pick(["USD", "EUR", "GBP"], i), status: pick(["succeeded", "failed", "refunded"], i),
      payment_method: pick(["credit_card", "sepa_debit", "paypal"], i), failure_reason: i % 10 === 0 ? "card_declined" : null,
      created_at: new Date(Date.UTC(2025, i % 12, 1 + (i % 28), 10, i % 60)).toISOString(),
    }));
  }, n);
  // The library is loaded (and its wasm compiled) before measuring.
  await page.evaluate(async (who) => {
    if (who === "handover") {
      const m = await import("/pkg/handover.js");
      await m.default();
      window.__lib = m;
    } else if (who === "wasm-xlsxwriter") {
      const m = await import("/node_modules/wasm-xlsxwriter/web/wasm_xlsxwriter.js");
      await m.default();
      window.__lib = m;
    }
  }, who);
  const run = async ({ who, format, warm }) => {
    const records = warm ? window.records.slice(0, 2000) : window.records;
    const t0 = performance.now();
    let blob;
    if (who === "handover") {
      blob = window.__lib.formatRecords({ payment_history: records }, { format, output: "blob" });
      return (performance.now() - t0) / 1000 + (blob.size > 0 ? 0 : NaN);
    }
    if (who === "JSON.stringify") {
      blob = new Blob([JSON.stringify({ export: { request_id: "x", generated_at: new Date().toISOString(), data_types: ["payment_history"], data: { payment_history: records } }, metadata: { total_records: records.length } })], { type: "application/json" });
    } else if (who === "PapaParse") {
      blob = new Blob([window.Papa.unparse(records)], { type: "text/csv" });
    } else if (who === "SheetJS") {
      const wb = window.XLSX.utils.book_new();
      window.XLSX.utils.book_append_sheet(wb, window.XLSX.utils.json_to_sheet(records), "payment_history");
      blob = new Blob([window.XLSX.write(wb, { type: "array", bookType: "xlsx" })]);
    } else if (who === "wasm-xlsxwriter") {
      const x = window.__lib;
      const wb = new x.Workbook();
      const ws = wb.addWorksheet();
      const cols = Object.keys(records[0]);
      ws.writeRow(0, 0, cols);
      for (let r = 0; r < records.length; r++) ws.writeRow(r + 1, 0, cols.map((c) => records[r][c] ?? ""));
      blob = new Blob([wb.saveToBufferSync()]);
    }
    return (performance.now() - t0) / 1000 + (blob.size > 0 ? 0 : NaN);
  };
  // Warmed up on 2000 records first (the engine compiles hot code the first
  // time, for every contender alike); then measured.
  await page.evaluate(`(${run})(${JSON.stringify({ who, format, warm: true })})`).catch(() => {});
  await new Promise((ok) => setTimeout(ok, 500));
  const base = rssNow();
  resetPeak();
  const s = await page.evaluate(`(${run})(${JSON.stringify({ who, format, warm: false })})`)
    .catch((e) => ({ failed: String(e.message ?? e).split("\n")[0].replace(/^page.evaluate: /, "") }));
  if (s.failed) return { failed: s.failed };
  return { s, mb: grownMb(base) };
}

/** The fetch loop app developers write: every page, every record kept, one library call at the end. */
async function handWritten(page, baseUrl, token, format, lib) {
  if (lib === "PapaParse") await page.addScriptTag({ path: join(ROOT, "node_modules/papaparse/papaparse.min.js") });
  if (lib === "SheetJS") await page.addScriptTag({ path: join(ROOT, "node_modules/xlsx/dist/xlsx.full.min.js") });
  return page.evaluate(async ({ baseUrl, token, format, lib }) => {
    const t0 = performance.now();
    const headers = { authorization: `Bearer ${token}`, "x-company-id": "company_123" };
    const created = await (await fetch(`${baseUrl}/api/data/export`, { method: "POST", headers: { ...headers, "content-type": "application/json" },
      body: JSON.stringify({ export_format: format, data_types: ["payment_history"], delivery: "client" }) })).json();
    const id = created.data.request_id;
    const records = [];
    let cursor = "";
    for (let i = 0; i < 100000; i++) {
      const page = (await (await fetch(`${baseUrl}/api/data/export/${id}/records/payment_history?limit=5000&cursor=${encodeURIComponent(cursor)}`, { headers })).json()).data;
      const names = page.columns.map((c) => c.name);
      for (const row of page.rows) {
        const r = {};
        for (let c = 0; c < names.length; c++) r[names[c]] = row[c];
        records.push(r);
      }
      if (page.next_cursor === null) break;
      cursor = page.next_cursor;
    }
    let blob;
    if (lib === "PapaParse") blob = new Blob([window.Papa.unparse(records)]);
    else if (lib === "JSON.stringify") blob = new Blob([JSON.stringify({ export: { request_id: id, data: { payment_history: records } } })]);
    else {
      const wb = window.XLSX.utils.book_new();
      window.XLSX.utils.book_append_sheet(wb, window.XLSX.utils.json_to_sheet(records), "payment_history");
      blob = new Blob([window.XLSX.write(wb, { type: "array", bookType: "xlsx" })]);
    }
    return (performance.now() - t0) / 1000 + (blob.size > 0 ? 0 : NaN);
  }, { baseUrl, token, format, lib });
}
