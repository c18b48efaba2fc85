// End to end: the demo Privacy Settings page served by `handover-server
// serve --demo`, driven in Debian's Chromium with playwright-core. Each
// format is exported by clicking, the download is captured and checked
// record by record against the database (tests/js/support/check_export.py:
// json, csv, openpyxl). Screenshots land in test-artifacts/.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { request } from "node:http";
import { mkdirSync, existsSync, copyFileSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { launch } from "./support/chromium.mjs";
import { makeDatabase, makeToken, startServer, removeDatabase, ROOT } from "./support/server.mjs";

const ARTIFACTS = join(ROOT, "test-artifacts");
let db, server, browser, page;

function check(file, format) {
  const out = execFileSync("python3", [join(ROOT, "tests/js/support/check_export.py"), file, format,
    join(db.dir, "handover.db"), "user_456", "company_123", join(ROOT, "server/config/datatypes.toml")], { encoding: "utf8" });
  return JSON.parse(out);
}

async function exportVia(format) {
  await page.check(`input[name=format][value=${format}]`);
  const [download] = await Promise.all([page.waitForEvent("download", { timeout: 60000 }), page.click("#export-button")]);
  const file = join(ARTIFACTS, `e2e-${download.suggestedFilename()}`);
  await download.saveAs(file);
  await page.waitForFunction(() => document.querySelector("#status").classList.contains("ok"), null, { timeout: 30000 });
  return { file, name: download.suggestedFilename() };
}

before(async () => {
  assert.ok(existsSync(join(ROOT, "pkg/handover.js")), "pkg/ is missing: run scripts/build-pkg.sh");
  mkdirSync(ARTIFACTS, { recursive: true });
  db = makeDatabase({ users: 3, records: 400 });
  server = await startServer(db, { args: ["--demo", "--www-dir", join(ROOT, "www"), "--pkg-dir", join(ROOT, "pkg")] });
  browser = await launch();
  page = await browser.newPage({ acceptDownloads: true, viewport: { width: 900, height: 1100 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(e));
  await page.goto(server.url);
  await page.waitForSelector("body[data-ready=true]", { timeout: 30000 });
  assert.deepEqual(errors, []);
});

after(async () => {
  await browser?.close();
  await server?.stop();
  if (db) removeDatabase(db);
});

test("the card shows the user's real counts from the summary endpoint", async () => {
  const counts = await page.$$eval("#included li", (lis) => lis.map((li) => [li.dataset.type, li.querySelector("strong").textContent]));
  const expected = check(join(ROOT, "tests/js/support/blank.html"), "none").types;
  assert.deepEqual(Object.fromEntries(counts), Object.fromEntries(Object.entries(expected).map(([k, v]) => [k, v.toLocaleString("en-US")])));
  await page.screenshot({ path: join(ARTIFACTS, "card-before.png") });
  // Accessible names and the live region.
  assert.equal(await page.getAttribute("#status", "aria-live"), "polite");
  assert.equal(await page.getAttribute("#progress", "aria-labelledby"), "progress-label");
  await page.keyboard.press("Tab");
});

const kept = {};

for (const format of ["json", "csv", "xlsx"]) {
  test(`exporting ${format} by clicking downloads a complete, correct file`, async () => {
    // The CSV export also keeps an end-to-end encrypted copy.
    if (format === "csv") await page.check("#keep-copy");
    else await page.uncheck("#keep-copy");
    const { file, name } = await exportVia(format);
    if (format === "csv") {
      await page.waitForSelector("#copy-box:not([hidden])", { timeout: 10000 });
      Object.assign(kept, { file, name, link: await page.inputValue("#copy-link") });
    }
    assert.match(name, new RegExp(`^export_[0-9a-f]+\\.${format}$`));
    const { types } = check(file, format);
    assert.ok(types.payment_history > 100, "a real amount of data was checked");
    assert.equal(await page.$eval("#progress", (p) => p.value), 100);
    assert.equal(await page.textContent("#progress-pct"), "100%");
    const requestId = name.split(".")[0];
    await page.waitForSelector(`#recent tr[data-request-id="${requestId}"] .badge.completed`, { timeout: 10000 });
  });
}

test("the kept copy's link downloads the same file again, decrypted in the browser", async () => {
  const id = kept.name.split(".")[0];
  assert.match(kept.link, new RegExp(`^${server.url}/?#copy=${id}&key=[A-Za-z0-9_-]{43}$`));
  // Listed with a download, in the page that made it (the key is remembered there).
  await page.waitForSelector(`#recent tr[data-request-id="${id}"] button.link`, { timeout: 10000 });
  // The link alone is enough: a fresh browser context, nothing remembered.
  const other = await browser.newPage({ acceptDownloads: true });
  try {
    await other.goto(kept.link);
    await other.waitForSelector("body[data-ready=true]", { timeout: 30000 });
    await other.waitForSelector("#open-copy:not([hidden])");
    const [download] = await Promise.all([other.waitForEvent("download", { timeout: 30000 }), other.click("#open-copy-button")]);
    assert.equal(download.suggestedFilename(), kept.name);
    const again = join(ARTIFACTS, `e2e-copy-${kept.name}`);
    await download.saveAs(again);
    assert.ok(readFileSync(again).equals(readFileSync(kept.file)), "the same bytes as the first download");
    // A link whose key was damaged says so, and downloads nothing.
    const damaged = kept.link.replace(/key=(.)/, (_, c) => `key=${c === "A" ? "B" : "A"}`);
    await other.goto("about:blank");
    await other.goto(damaged);
    await other.waitForSelector("body[data-ready=true]", { timeout: 30000 });
    let downloaded = false;
    other.once("download", () => { downloaded = true; });
    await other.click("#open-copy-button");
    await other.waitForFunction(() => document.querySelector("#status").classList.contains("error"), null, { timeout: 10000 });
    assert.match(await other.textContent("#status"), /does not open the copy/);
    assert.equal(downloaded, false);
  } finally {
    await other.close();
  }
});

/** Runs exportData in the page (as another demo user, so the demo user's
 * five creates an hour stay for the clicks) and returns what it saw. */
async function inPage(body, options, { user = "user_0001", company = "company_456" } = {}) {
  const token = makeToken(db, user, company);
  return page.evaluate(async ({ body, options, token, company }) => {
    const { exportData } = await import("/pkg/handover.js");
    const base = { baseUrl: location.origin, token, companyId: company, dataTypes: ["user_profile", "payment_history", "recovery_cases"] };
    const opfsFiles = async () => {
      const root = await navigator.storage.getDirectory();
      let dir;
      try { dir = await root.getDirectoryHandle("handover"); } catch { return []; }
      const names = [];
      for await (const name of dir.keys()) names.push(name);
      return names;
    };
    const bytes = async (blob) => Array.from(new Uint8Array(await blob.arrayBuffer()));
    return (new Function("exportData", "base", "opfsFiles", "bytes", "options", `return (async () => { ${body} })()`))(exportData, base, opfsFiles, bytes, options);
  }, { body, options, token, company });
}

/**
 * Lets the first two requests for records through and holds later ones
 * until the returned function is called (bounded: released after 15 s in
 * any case), so that a cancel reliably lands mid-export.
 */
async function holdPagesAfterTwo() {
  let pages = 0;
  let release;
  const gate = new Promise((ok) => { release = ok; setTimeout(ok, 15000); });
  await page.route("**/records/**", async (route) => {
    pages += 1;
    if (pages > 2) await gate;
    await route.continue().catch(() => { /* aborted by the cancel */ });
  });
  return release;
}

test("an export in the worker and one on the page give byte-identical files", async () => {
  // Two users: each may create five exports an hour.
  const body = `
    const runs = {};
    for (const format of options.formats) {
      // Small pages, so that many progress events come close together.
      const progress = { w: [], h: [] };
      const seen = (list) => (p) => list.push([p.currentType, p.recordsProcessed, p.totalRecords, p.percentage]);
      const w = await exportData({ ...base, format, download: false, pageSize: 25, onProgress: seen(progress.w) });
      const h = await exportData({ ...base, format, download: false, worker: false, pageSize: 25, onProgress: seen(progress.h) });
      const same = JSON.stringify(await bytes(w.blob)) === JSON.stringify(await bytes(h.blob));
      const hex = async (blob) => Array.from(new Uint8Array(await crypto.subtle.digest("SHA-256", await blob.arrayBuffer())))
        .map((b) => b.toString(16).padStart(2, "0")).join("");
      const blobShas = [await hex(w.blob), await hex(h.blob)];
      const files = await opfsFiles();
      await w.release();
      runs[format] = { same, progress, records: w.recordCount, w: w.stats, h: h.stats, sizes: [w.byteSize, h.byteSize, w.blob.size],
        shas: [w.sha256, h.sha256], blobShas, name: w.requestId + "." + format, filesBefore: files, filesAfter: await opfsFiles() };
    }
    return runs;
  `;
  // The page compiled the module when it loaded; the export's workers get
  // it from the page instead of fetching (and compiling) it again.
  const wasmFetches = [];
  const onRequest = (r) => { if (new URL(r.url()).pathname.endsWith(".wasm")) wasmFetches.push(r.url()); };
  page.on("request", onRequest);
  let out;
  try {
    out = {
      ...(await inPage(body, { formats: ["csv", "json"] }, { user: "user_0002", company: "company_789" })),
      ...(await inPage(body, { formats: ["xlsx"] })),
    };
  } finally {
    page.off("request", onRequest);
  }
  assert.deepEqual(wasmFetches, [], "the workers fetched the module again");
  // The packing worker with the file in memory: a Blob made in a worker
  // that ends with the export.
  const memory = await inPage(`
    const r = await exportData({ ...base, format: "xlsx", download: false, storage: "memory" });
    const digest = await crypto.subtle.digest("SHA-256", await r.blob.arrayBuffer());
    const sha = Array.from(new Uint8Array(digest)).map((b) => b.toString(16).padStart(2, "0")).join("");
    return { stats: r.stats, sha, reported: r.sha256, size: r.blob.size, byteSize: r.byteSize,
      zip: Array.from(new Uint8Array(await r.blob.slice(0, 2).arrayBuffer())) };
  `, {}, { user: "user_0002", company: "company_789" });
  assert.deepEqual([memory.stats.worker, memory.stats.packWorker, memory.stats.storage], [true, true, "memory"]);
  assert.equal(memory.sha, memory.reported, "the in-memory file is the one reported");
  assert.equal(memory.size, memory.byteSize);
  assert.deepEqual(memory.zip, [0x50, 0x4b], "a zip package");
  assert.deepEqual(Object.keys(out), ["csv", "json", "xlsx"]);
  // CSV carries no request id or time, so the two files are the same bytes
  // (the XLSX package's assembly elsewhere is proved byte for byte in
  // tests/formats.rs); every file is the one its sha256 and byteSize name.
  assert.equal(out.csv.same, true, "csv: byte-identical");
  assert.equal(out.csv.shas[0], out.csv.shas[1]);
  for (const [format, run] of Object.entries(out)) {
    // The worker sends progress to the page in batches; every event still
    // reaches onProgress, in order, the same as on the page.
    assert.deepEqual(run.progress.w, run.progress.h, `${format}: the worker's progress events are the page's`);
    assert.ok(run.progress.w.length >= run.records / 25 && run.records >= 250,
      `${format}: at least one event per page of 25 (${run.progress.w.length} events, ${run.records} records)`);
    assert.deepEqual(run.progress.w.at(-1).slice(1), [run.progress.w.at(-1)[1], run.progress.w.at(-1)[1], 100]);
    assert.deepEqual(run.blobShas, run.shas, `${format}: sha256 is the file's`);
    assert.equal(run.sizes[0], run.sizes[2], `${format}: byteSize is the file's size`);
    assert.deepEqual([run.w.worker, run.w.storage], [true, "opfs"], `${format}: the default runs in a worker, on disk`);
    assert.equal(run.w.packWorker, true, `${format}: a second worker builds the file`);
    assert.deepEqual([run.h.worker, run.h.storage, run.h.packWorker], [false, "memory", false]);
    assert.ok(run.w.wasmMemoryBytes <= 64 << 20, `${format}: worker wasm memory ${run.w.wasmMemoryBytes}`);
    assert.ok(run.w.packWasmMemoryBytes > 0 && run.w.packWasmMemoryBytes <= 64 << 20,
      `${format}: packing worker wasm memory ${run.w.packWasmMemoryBytes}`);
    assert.ok(run.filesBefore.includes(run.name), `${format}: the file lived in the Origin Private File System`);
    assert.ok(!run.filesAfter.includes(run.name), `${format}: release() removed it`);
  }
});

test("the Origin Private File System file goes after a download and after a cancel", async () => {
  const out = await inPage(`
    const files = [];
    const r = await exportData({ ...base, format: "xlsx", releaseFileAfterMs: 200 });
    const name = r.requestId + ".xlsx";
    files.push(await opfsFiles());
    // Bounded: the file is removed 200 ms after the download started.
    for (let i = 0; i < 100 && (await opfsFiles()).includes(name); i++) await new Promise((ok) => setTimeout(ok, 50));
    files.push(await opfsFiles());
    return { files, name, storage: r.stats.storage };
  `);
  assert.equal(out.storage, "opfs");
  assert.ok(out.files[0].includes(out.name), "the downloaded file was on disk");
  assert.ok(!out.files[1].includes(out.name), "removed after the download");
  // The cancel: caught mid-way however fast this machine pages.
  const release = await holdPagesAfterTwo();
  let cancelled;
  try {
    cancelled = await inPage(`
      const before = await opfsFiles();
      const controller = new AbortController();
      let code = null;
      try {
        await exportData({ ...base, format: "json", download: false, pageSize: 5, signal: controller.signal,
          onProgress: (p) => { if (p.recordsProcessed >= 10) controller.abort(); } });
      } catch (e) { code = e.code; }
      const after = await opfsFiles();
      return { code, added: after.filter((f) => !before.includes(f)) };
    `);
  } finally {
    release();
    await page.unroute("**/records/**");
  }
  assert.equal(cancelled.code, "ABORTED");
  assert.deepEqual(cancelled.added, [], "a cancelled export leaves no file");
});

test("progress, cancel and the during/after screenshots", async () => {
  // Held until the test has clicked Cancel, so the export is reliably
  // caught mid-way.
  const release = await holdPagesAfterTwo();
  await page.check("input[name=format][value=xlsx]");
  await page.click("#export-button");
  await page.waitForFunction(() => Number(document.querySelector("#progress").value) >= 10, null, { timeout: 30000 });
  assert.equal(await page.textContent("#export-button"), "Preparing export…");
  assert.notEqual(await page.textContent("#progress-type"), "");
  await page.screenshot({ path: join(ARTIFACTS, "card-during.png") });
  let downloaded = false;
  page.once("download", () => { downloaded = true; });
  await page.click("#cancel-button");
  await page.waitForFunction(() => document.querySelector("#status").textContent.includes("cancelled"), null, { timeout: 10000 });
  release();
  assert.equal(downloaded, false);
  // Shown as cancelled (the server keeps it as failed, reason "cancelled").
  await page.waitForSelector("#recent .badge.cancelled", { timeout: 10000 });
  await page.unroute("**/records/**");
  await page.screenshot({ path: join(ARTIFACTS, "card-after.png") });
});

test("the rate limit is explained with the time of the next possible export", async () => {
  // Five creates per hour: json, csv, xlsx and the cancelled one were four;
  // the fifth goes through, the sixth is refused.
  await exportVia("json");
  await page.check("input[name=format][value=json]");
  await page.click("#export-button");
  await page.waitForFunction(() => document.querySelector("#status").classList.contains("error"), null, { timeout: 30000 });
  const text = await page.textContent("#status");
  assert.match(text, /You can request another export at \d{1,2}:\d{2}/);
  await page.screenshot({ path: join(ARTIFACTS, "card-rate-limited.png") });
  // UPDATE_SCREENSHOTS=1 refreshes the README's picture.
  if (process.env.UPDATE_SCREENSHOTS) copyFileSync(join(ARTIFACTS, "card-during.png"), join(ROOT, "docs", "privacy-settings.png"));
});

test("a wrong method on any path answers in the API's error envelope", async () => {
  // Sent as is (fetch would resolve the dots): the demo's file server owns this path.
  const { status, type, body } = await new Promise((ok, fail) => {
    const u = new URL(server.url);
    const req = request({ host: u.hostname, port: u.port, method: "POST", path: "/api/data/export/../../etc/passwd" }, (res) => {
      let text = "";
      res.on("data", (c) => { text += c; });
      res.on("end", () => ok({ status: res.statusCode, type: res.headers["content-type"], body: text }));
    });
    req.on("error", fail);
    req.end();
  });
  assert.equal(status, 405);
  assert.match(type, /^application\/json/);
  const parsed = JSON.parse(body);
  assert.equal(parsed.success, false);
  assert.equal(parsed.error.code, "METHOD_NOT_ALLOWED");
});

test("a download the page refuses keeps the finished file with the error", async () => {
  const runs = await inPage(`
    const original = URL.createObjectURL;
    URL.createObjectURL = () => { throw new Error("blocked by the page"); };
    const runs = [];
    try {
      for (const worker of [true, false]) {
        try {
          await exportData({ ...base, format: "csv", worker });
          runs.push({ worker, resolved: true });
        } catch (e) {
          const r = e.details?.result;
          const d = r && await (await fetch(base.baseUrl + "/api/data/export/" + r.requestId,
            { headers: { Authorization: "Bearer " + base.token, "X-Company-ID": base.companyId } })).json();
          runs.push({ worker, name: e.name, code: e.code, message: e.message, size: r?.blob?.size,
            byteSize: r?.byteSize, status: d?.data?.status, ranInWorker: r?.stats?.worker });
        }
      }
    } finally {
      URL.createObjectURL = original;
    }
    return runs;
  `, {}, { user: "user_0003", company: "company_123" });
  assert.equal(runs.length, 2);
  for (const run of runs) {
    assert.equal(run.name, "ExportError", JSON.stringify(run));
    assert.equal(run.code, "DOWNLOAD_UNAVAILABLE");
    assert.match(run.message, /blocked by the page/);
    assert.equal(run.ranInWorker, run.worker);
    assert.ok(run.byteSize > 0 && run.size === run.byteSize, `the file is with the error: ${JSON.stringify(run)}`);
    assert.equal(run.status, "completed", "a refused download is not a failed export");
  }
});

test("an export started in a srcdoc frame with baseUrl \"\" goes to the page's origin, in a worker or not", async () => {
  // A srcdoc frame's location is about:srcdoc; fetch resolves its relative
  // URLs against the parent's base URL, and so must the origin check.
  const token = makeToken(db, "user_0003", "company_123");
  await page.evaluate(() => new Promise((loaded) => {
    const frame = document.createElement("iframe");
    frame.id = "srcdoc-frame";
    frame.onload = () => loaded();
    frame.srcdoc = "<!doctype html><title>frame</title><p>frame";
    document.body.append(frame);
  }));
  const frame = page.frames().find((f) => f.url() === "about:srcdoc");
  assert.ok(frame, "the srcdoc frame is there");
  const runs = await frame.evaluate(async ({ token }) => {
    const handover = await import(new URL("/pkg/handover.js", document.baseURI).href);
    await handover.default();
    const { exportData } = handover;
    const runs = [];
    for (const worker of [false, true]) {
      try {
        const r = await exportData({ baseUrl: "", token, companyId: "company_123", format: "csv",
          dataTypes: ["user_profile"], worker, download: false });
        runs.push({ worker, href: location.href, records: r.recordCount, size: r.blob.size, byteSize: r.byteSize,
          ranInWorker: r.stats.worker });
      } catch (e) {
        runs.push({ worker, href: location.href, code: e.code, message: e.message });
      }
    }
    return runs;
  }, { token });
  await page.evaluate(() => document.getElementById("srcdoc-frame").remove());
  assert.equal(runs.length, 2);
  for (const run of runs) {
    assert.equal(run.href, "about:srcdoc");
    assert.equal(run.code, undefined, JSON.stringify(run));
    assert.equal(run.records, 1, JSON.stringify(run));
    assert.equal(run.ranInWorker, run.worker, JSON.stringify(run));
    assert.ok(run.size > 0 && run.size === run.byteSize, JSON.stringify(run));
  }
});
