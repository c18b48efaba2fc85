// The demo page on another app's data types (server/config/pomodoro.toml):
// the card lists what that config offers, and an export by clicking
// carries every one of its types, checked record by record against the
// database with the config's own queries.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { launch } from "./support/chromium.mjs";
import { makeDatabase, startServer, removeDatabase, ROOT } from "./support/server.mjs";

const CONFIG = join(ROOT, "server/config/pomodoro.toml");
const ARTIFACTS = join(ROOT, "test-artifacts");
let db, server, browser, page;

before(async () => {
  mkdirSync(ARTIFACTS, { recursive: true });
  db = makeDatabase({ users: 2, records: 120, config: CONFIG });
  server = await startServer(db, { args: ["--demo", "--www-dir", join(ROOT, "www"), "--pkg-dir", join(ROOT, "pkg")] });
  browser = await launch();
  page = await browser.newPage({ acceptDownloads: true });
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

test("with another app's data types the demo page lists and exports all of them", async () => {
  const listed = await page.$$eval("#included li", (lis) => lis.map((li) => li.dataset.type));
  const configured = [...execFileSync("python3", ["-c",
    "import sys, tomllib; print('\\n'.join(t['name'] for t in tomllib.load(open(sys.argv[1], 'rb'))['data_type']))", CONFIG],
    { encoding: "utf8" }).trim().split("\n")];
  assert.deepEqual(listed, configured);
  assert.ok(!listed.includes("payment_history"));
  await page.check("input[name=format][value=json]");
  const [download] = await Promise.all([page.waitForEvent("download", { timeout: 60000 }), page.click("#export-button")]);
  const file = join(ARTIFACTS, `pomodoro-${download.suggestedFilename()}`);
  await download.saveAs(file);
  await page.waitForFunction(() => document.querySelector("#status").classList.contains("ok"), null, { timeout: 30000 });
  const out = JSON.parse(execFileSync("python3", [join(ROOT, "tests/js/support/check_export.py"), file, "json",
    join(db.dir, "handover.db"), "user_456", "company_123", CONFIG], { encoding: "utf8" }));
  assert.deepEqual(Object.keys(out.types), configured);
  assert.ok(Object.values(out.types).reduce((a, b) => a + b, 0) > 0, "real records were checked");
});
