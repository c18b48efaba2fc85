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
      // A getter of the caller's that throws, under declared columns.
      [{ a: [{ get x() { throw new Error("boom"); } }] }, { format: "csv", columns: { a: [{ name: "x", kind: "string" }] } }],
      [{ a: [] }, { format: "csv", dateRange: { start: "2025-02-01T00:00:00Z", end: "2025-01-01T00:00:00Z" } }],
      // A misspelt range is an error, not a file without its range.
      [{ a: [] }, { format: "csv", dateRange: { from: "2025-01-01T00:00:00Z" } }],
    ]) {
      try { formatRecords(data, options); out.push("no throw"); } catch (e) {
        out.push({ isError: e instanceof Error, isExportError: e instanceof ExportError, name: e.name,
          code: e.code, hasStack: typeof e.stack === "string" && e.stack.length > 0 });
      }
    }
    return out;
  });
  assert.deepEqual(got.map((e) => e.code), ["INVALID_FORMAT", "INVALID_RECORD", "INVALID_DATE", "INVALID_OPTIONS",
    "INVALID_RECORD", "DATE_RANGE_INVALID", "DATE_RANGE_INVALID"]);
  for (const e of got) {
    assert.equal(e.isError, true);
    assert.equal(e.isExportError, true);
    assert.equal(e.name, "ExportError");
    assert.equal(e.hasStack, true);
  }
});

test("records as objects give the same files as the same records as JSON text", async () => {
  const got = await page.evaluate(async () => {
    const { default: init, formatRecords } = await import("/pkg/handover.js");
    await init();
    const text = await (await fetch("/tests/fixtures/records.json")).text();
    const objects = JSON.parse(text);
    const options = { requestId: "export_123456789", generatedAt: "2025-10-25T19:50:00.000Z", userId: "user_456" };
    const hex = async (b) => [...new Uint8Array(await crypto.subtle.digest("SHA-256", b))].map((x) => x.toString(16).padStart(2, "0")).join("");
    const out = {};
    for (const format of ["csv", "xlsx"]) {
      // The text of what the objects hold (JSON.parse rounded the integers beyond 2^53).
      const viaText = formatRecords(JSON.stringify(objects), { ...options, format });
      const viaObjects = formatRecords(objects, { ...options, format });
      out[format] = [await hex(viaText), await hex(viaObjects), viaObjects instanceof Uint8Array];
    }
    const j1 = JSON.parse(new TextDecoder().decode(formatRecords(JSON.stringify(objects), { ...options, format: "json" })));
    const j2 = JSON.parse(new TextDecoder().decode(formatRecords(objects, { ...options, format: "json" })));
    out.json = JSON.stringify(j1) === JSON.stringify(j2);
    const blob = formatRecords(objects, { ...options, format: "csv", output: "blob" });
    out.blob = [blob instanceof Blob, blob.type, await hex(await blob.arrayBuffer()) === out.csv[0]];
    return out;
  });
  assert.equal(got.csv[0], got.csv[1], "CSV: objects = text");
  assert.equal(got.csv[2], true);
  assert.equal(got.xlsx[0], got.xlsx[1], "XLSX: objects = text");
  assert.equal(got.json, true, "JSON: the same records");
  assert.deepEqual(got.blob, [true, "text/csv; charset=utf-8", true]);
});

test("records as objects: dates, BigInt, unknown fields, bad records", async () => {
  const got = await page.evaluate(async () => {
    const { default: init, formatRecords } = await import("/pkg/handover.js");
    await init();
    const csv = (data, extra = {}) => new TextDecoder().decode(formatRecords(data, { format: "csv", ...extra }));
    const code = (f) => { try { f(); return "no throw"; } catch (e) { return e.code; } };
    return {
      dates: csv({ t: [{ at: new Date("2025-10-24T19:50:00Z"), n: 1 }, { at: null, n: 2.5 }] }),
      big: csv({ t: [{ n: 123456789012345678901234567890n, m: 5n }] }),
      nested: csv({ t: [{ a: { b: 1, c: { d: "x" } } }, { a: null }] }),
      unknown: code(() => formatRecords({ t: [{ a: 1, b: 2 }] }, { format: "csv", columns: { t: [{ name: "a", kind: "integer" }] } })),
      notObject: code(() => formatRecords({ t: [1] }, { format: "csv" })),
      notArray: code(() => formatRecords({ t: {} }, { format: "csv" })),
      badDate: code(() => formatRecords({ t: [{ at: "soon" }] }, { format: "json", columns: { t: [{ name: "at", kind: "datetime" }] } })),
      cycle: code(() => { const a = { x: 1 }; a.self = [a]; return formatRecords({ t: [a] }, { format: "csv" }); }),
      unicode: csv({ t: [{ s: "Zoë 😀 日本" }, { s: "=1+2" }] }),
    };
  });
  assert.equal(got.dates, "data_type,at,n\r\nt,2025-10-24T19:50:00.000Z,1\r\nt,,2.5\r\n");
  assert.equal(got.big, "data_type,n,m\r\nt,123456789012345678901234567890,5\r\n");
  assert.equal(got.nested, "data_type,a.b,a.c.d\r\nt,1,x\r\nt,,\r\n");
  assert.equal(got.unknown, "UNKNOWN_FIELD");
  assert.equal(got.notObject, "INVALID_RECORD");
  assert.equal(got.notArray, "INVALID_RECORD");
  assert.equal(got.badDate, "INVALID_DATE");
  assert.equal(got.cycle, "INVALID_RECORD");
  assert.equal(got.unicode, "data_type,s\r\nt,Zoë 😀 日本\r\nt,'=1+2\r\n");
});

test("exportData refuses what JSON would drop at any depth, and takes what toJSON gives", async () => {
  const got = await page.evaluate(async () => {
    const { default: init, exportData } = await import("/pkg/handover.js");
    await init();
    // Nothing listens on port 9: options that pass fail at the first request.
    const base = { baseUrl: "http://127.0.0.1:9", token: "hov_x", companyId: "c", worker: false, retries: 1 };
    const codes = [];
    for (const extra of [
      { metadata: { a: { b: { c: { d: NaN } } } } },
      { onprogress: () => {} },
      { metadata: { when: { toJSON() { return "x"; } } } },
    ]) {
      try { await exportData({ ...base, ...extra }); codes.push("resolved"); } catch (e) { codes.push(e.code); }
    }
    return codes;
  });
  assert.deepEqual(got, ["INVALID_OPTIONS", "INVALID_OPTIONS", "NETWORK_ERROR"]);
});
