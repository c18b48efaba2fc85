// The npm package as an app developer uses it: `npm install` the built
// pkg/ into a fresh app, bundle the app with esbuild, and run the bundle
// in Chromium against a real handover-server (formatRecords, exportData,
// exportDataInWorker, ExportError).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, writeFileSync, copyFileSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { launch } from "./support/chromium.mjs";
import { serveStatic } from "./support/static-server.mjs";
import { makeDatabase, makeToken, startServer, removeDatabase, ROOT } from "./support/server.mjs";

let app, db, server, web, browser;

before(async () => {
  app = mkdtempSync(join(tmpdir(), "handover-app-"));
  writeFileSync(join(app, "package.json"), JSON.stringify({ name: "some-app", private: true, type: "module" }));
  execFileSync("npm", ["install", "--no-audit", "--no-fund", "--loglevel=error", join(ROOT, "pkg")], { cwd: app, stdio: "inherit" });
  const pkgJson = JSON.parse(readFileSync(join(app, "node_modules/handover/package.json"), "utf8"));
  assert.equal(pkgJson.name, "handover");
  assert.equal(pkgJson.types, "./handover.d.ts");
  writeFileSync(join(app, "main.js"), `
    import init, { formatRecords, exportData, exportDataInWorker, ExportError } from "handover";
    window.run = async ({ baseUrl, token }) => {
      await init({ module_or_path: "/handover_bg.wasm" });
      const out = {};
      const csv = formatRecords({ payment_history: [{ id: "p1", amount_cents: 2999 }] }, { format: "csv" });
      out.csv = new TextDecoder().decode(csv);
      try { formatRecords({}, { format: "pdf" }); } catch (e) { out.formatError = [e instanceof ExportError, e.code]; }
      const r = await exportData({ baseUrl, token, companyId: "company_123", format: "json",
        dataTypes: ["user_profile", "payment_history"], download: false });
      out.exported = { records: r.recordCount, bytes: r.byteSize, isBlob: r.blob instanceof Blob, sha: r.sha256,
        worker: r.stats.worker, storage: r.stats.storage };
      await r.release();
      // Without dataTypes: every type the server offers.
      const all = await exportData({ baseUrl, token, companyId: "company_123", format: "json", download: false });
      out.allTypes = JSON.parse(await all.blob.text()).export.data_types;
      await all.release();
      const w = await exportDataInWorker({ baseUrl, token, companyId: "company_123", format: "csv",
        dataTypes: ["payment_history"], download: false, onProgress: (p) => { out.lastWorkerProgress = p.percentage; } });
      out.worker = { records: w.recordCount, isBlob: w.blob instanceof Blob };
      try { await exportData({ baseUrl, token, companyId: "company_123", dataTypes: [] }); } catch (e) { out.optionError = [e instanceof ExportError, e.code]; }
      return out;
    };
    // No baseUrl: requests go to the page's base URL (its <base href>), from a worker too.
    window.runHere = async ({ token, worker }) => {
      await init({ module_or_path: new URL("/handover_bg.wasm", import.meta.url) });
      const r = await exportData({ token, companyId: "company_123", format: "csv",
        dataTypes: ["payment_history"], download: false, worker });
      const out = { records: r.recordCount, sha: r.sha256, worker: r.stats.worker };
      await r.release();
      return out;
    };
  `);
  const esbuild = join(ROOT, "node_modules/.bin/esbuild");
  execFileSync(esbuild, ["main.js", "--bundle", "--format=esm", "--outfile=dist/main.js", "--log-level=warning"], { cwd: app, stdio: "inherit" });
  // The wasm and the worker scripts ship beside the bundle, as an app's build would copy them.
  for (const f of ["handover_bg.wasm", "worker.js", "export.js", "format.js", "handover.js"]) {
    copyFileSync(join(app, "node_modules/handover", f), join(app, "dist", f));
  }
  execFileSync("cp", ["-r", join(app, "node_modules/handover/snippets"), join(app, "dist/")]);
  writeFileSync(join(app, "dist/index.html"), '<!doctype html><meta charset="utf-8"><script type="module" src="/main.js"></script>');
  db = makeDatabase({ users: 1, records: 200 });
  server = await startServer(db);
  web = await serveStatic(join(app, "dist"));
  // A page whose base URL is the API's origin, while its scripts (and the
  // export's worker) come from the app's.
  writeFileSync(join(app, "dist/based.html"),
    `<!doctype html><meta charset="utf-8"><base href="${server.url}/"><script type="module" src="${web.url}/main.js"></script>`);
  browser = await launch();
});

after(async () => {
  await browser?.close();
  await web?.close();
  await server?.stop();
  if (db) removeDatabase(db);
  if (app) rmSync(app, { recursive: true, force: true });
});

test("a bundled app imports handover and runs every entry point", async () => {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(`${web.url}/index.html`);
  await page.waitForFunction(() => typeof window.run === "function");
  const token = makeToken(db, "user_456", "company_123");
  const out = await page.evaluate((args) => window.run(args), { baseUrl: server.url, token });
  assert.deepEqual(errors, []);
  assert.equal(out.csv, "data_type,id,amount_cents\r\npayment_history,p1,2999\r\n");
  assert.deepEqual(out.formatError, [true, "INVALID_FORMAT"]);
  assert.equal(out.exported.isBlob, true);
  assert.ok(out.exported.records > 100);
  assert.match(out.exported.sha, /^[0-9a-f]{64}$/);
  assert.equal(out.exported.worker, true, "exportData runs in a worker by default");
  assert.equal(out.exported.storage, "opfs", "and builds the file in the Origin Private File System");
  assert.equal(out.worker.isBlob, true);
  assert.ok(out.worker.records > 100);
  assert.equal(out.lastWorkerProgress, 100);
  assert.deepEqual(out.optionError, [true, "INVALID_DATA_TYPE"]);
  assert.deepEqual(out.allTypes, ["user_profile", "payment_history", "membership_data", "recovery_cases", "consent_data"]);
});

test("without baseUrl, an export goes to the page's base URL, in a worker as on the page", async () => {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(`${web.url}/based.html`);
  await page.waitForFunction(() => typeof window.runHere === "function");
  const token = makeToken(db, "user_456", "company_123");
  // The worker's own address is the app's origin, which serves no API.
  const inWorker = await page.evaluate((token) => window.runHere({ token }), token);
  const here = await page.evaluate((token) => window.runHere({ token, worker: false }), token);
  await page.close();
  assert.deepEqual(errors, []);
  assert.equal(inWorker.worker, true);
  assert.equal(here.worker, false);
  assert.ok(inWorker.records > 100, `${inWorker.records} records`);
  assert.equal(inWorker.sha, here.sha, "the same file either way");
});

test("the package's types check an app under strict TypeScript, and catch a misspelt option", () => {
  // The README's uses, typed as an app written against ES2022 + DOM would be
  // (no skipLibCheck: the package's declarations are checked too).
  writeFileSync(join(app, "app.ts"), `
    import init, { exportData, formatRecords, decryptExport, ExportError, type ExportProgress, type ExportResult } from "handover";
    await init();
    const bar = { value: 0 };
    const controller = new AbortController();
    const onProgress = (p: ExportProgress) => { bar.value = p.percentage; console.log(p.currentType, p.recordsProcessed, p.totalRecords, p.bytesWritten); };
    try {
      const result: ExportResult = await exportData({ baseUrl: "https://api.example.com", token: "hov_x", companyId: "company_123",
        format: "csv", dataTypes: ["user_profile", "payment_history"], dateRange: { start: "2025-01-01T00:00:00Z" },
        onProgress, signal: controller.signal });
      console.log(result.requestId, result.filename, result.byteSize, result.recordCount, result.sha256, result.blob.size);
    } catch (e) {
      if (e instanceof ExportError && e.code === "RATE_LIMIT_EXCEEDED") console.log(e.retryAfter, e.status, e.details);
    }
    // baseUrl defaults to the page's origin.
    await exportData({ token: "hov_x", companyId: "company_123" });
    const bytes: Uint8Array = formatRecords({ payment_history: [{ id: "p1", amount_cents: 2999 }] }, { format: "xlsx" });
    const blob: Blob = await decryptExport(bytes, "key");
    console.log(bytes.length, blob.size);
  `);
  const tsc = join(ROOT, "node_modules/.bin/tsc");
  const flags = ["--strict", "--noEmit", "--target", "ES2022", "--lib", "ES2022,DOM", "--module", "ESNext", "--moduleResolution", "bundler"];
  const check = (file) => {
    try {
      execFileSync(tsc, [...flags, file], { cwd: app, encoding: "utf8", stdio: "pipe" });
      return "";
    } catch (e) {
      return `${e.stdout}${e.stderr}`;
    }
  };
  assert.equal(check("app.ts"), "");
  writeFileSync(join(app, "typo.ts"), `
    import { exportData } from "handover";
    await exportData({ token: "hov_x", companyId: "company_123", onprogress: () => {} });
  `);
  assert.match(check("typo.ts"), /onprogress/);
});
