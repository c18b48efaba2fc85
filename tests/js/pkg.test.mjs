// The release package in pkg/ (wasm-opt'ed, as published) loaded by a page
// in real Chromium: init(), then formatRecords for each format, compared
// byte for byte with the native golden files. `wasm-pack test` never runs
// wasm-opt, so only this test catches a wasm-opt that breaks the module.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, existsSync } from "node:fs";
import { createHash } from "node:crypto";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { serveStatic } from "./support/static-server.mjs";
import { launch } from "./support/chromium.mjs";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const sha = (buf) => createHash("sha256").update(buf).digest("hex");
let server, browser, page;

before(async () => {
  assert.ok(existsSync(join(root, "pkg/handover.js")), "pkg/ is missing: run scripts/build-pkg.sh");
  server = await serveStatic(root);
  browser = await launch();
  page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e));
  await page.goto(`${server.url}/tests/js/support/blank.html`);
  assert.deepEqual(errors, []);
});

after(async () => {
  await browser?.close();
  await server?.close();
});

for (const [format, golden] of [["json", "fixture.json"], ["csv", "fixture.csv"], ["xlsx", "fixture.xlsx"]]) {
  test(`release pkg formats ${format} identically to the native golden file`, async () => {
    const got = await page.evaluate(async (format) => {
      const { default: init, formatRecords } = await import("/pkg/handover.js");
      await init();
      const fixture = await (await fetch("/tests/fixtures/records.json")).text();
      const bytes = formatRecords(fixture, {
        format, requestId: "export_123456789", generatedAt: "2025-10-25T19:50:00.000Z",
        dateRange: { start: "1999-01-01T00:00:00Z", end: "2025-10-25T19:50:00Z" }, userId: "user_456",
      });
      const digest = await crypto.subtle.digest("SHA-256", bytes);
      return { isU8: bytes instanceof Uint8Array, len: bytes.length,
        sha: [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("") };
    }, format);
    const expected = readFileSync(join(root, "tests/golden", golden));
    assert.equal(got.isU8, true);
    assert.equal(got.len, expected.length);
    assert.equal(got.sha, sha(expected));
  });
}

test("release pkg throws real ExportError objects with stable codes", async () => {
  const got = await page.evaluate(async () => {
    const { default: init, formatRecords, ExportError } = await import("/pkg/handover.js");
    await init();
    const out = [];
    for (const [data, options] of [
      [{ a: [{ x: 1 }] }, { format: "pdf" }],
      [{ a: [1] }, { format: "csv" }],
      [{ a: [{ at: "nope" }] }, { format: "xlsx", columns: { a: [{ name: "at", kind: "datetime" }] } }],
      [{}, null],
    ]) {
      try { formatRecords(data, options); out.push("no throw"); } catch (e) {
        out.push({ isError: e instanceof Error, isExportError: e instanceof ExportError, name: e.name,
          code: e.code, hasStack: typeof e.stack === "string" && e.stack.length > 0 });
      }
    }
    return out;
  });
  assert.deepEqual(got.map((e) => e.code), ["INVALID_FORMAT", "INVALID_RECORD", "INVALID_DATE", "INVALID_OPTIONS"]);
  for (const e of got) {
    assert.equal(e.isError, true);
    assert.equal(e.isExportError, true);
    assert.equal(e.name, "ExportError");
    assert.equal(e.hasStack, true);
  }
});
