// Benchmark: exportData in headless Chromium against a release
// handover-server, for one user with about BENCH_RECORDS payments.
// Prints a table: format, records, MB, seconds, records/s, peak renderer MB.
import { execFileSync } from "node:child_process";
import { readFileSync, readdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { launchWithProfile } from "../tests/js/support/chromium.mjs";
import { serveStatic } from "../tests/js/support/static-server.mjs";
import { startServer, ROOT } from "../tests/js/support/server.mjs";

const BIN = join(ROOT, "target/release/handover-server");
const records = Number(process.env.BENCH_RECORDS ?? 1_000_000);
const formats = (process.env.BENCH_FORMATS ?? "csv,json,xlsx").split(",");
const dir = mkdtempSync(join(tmpdir(), "handover-bench-"));
const env = { DATABASE_URL: `sqlite://${join(dir, "bench.db")}`, HANDOVER_DATA_DIR: join(dir, "data"), HANDOVER_MASTER_KEY: "22".repeat(32) };
const cli = (args) => execFileSync(BIN, args, { env: { ...process.env, ...env }, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] }).trim();
cli(["demo-data", "--users", "0", "--records", String(records)]);

// The server under test is the release build.
const server = await startServer({ dir, env }, { extraEnv: { HANDOVER_LOG: "info" }, bin: BIN });
const web = await serveStatic(ROOT);

function rendererPeakMb() {
  let peak = 0;
  for (const pid of readdirSync("/proc").filter((p) => /^\d+$/.test(p))) {
    try {
      const cmd = readFileSync(`/proc/${pid}/cmdline`, "utf8");
      if (!cmd.includes("chromium") || !cmd.includes("--type=renderer")) continue;
      const hwm = /VmHWM:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
      if (hwm) peak = Math.max(peak, Number(hwm[1]) / 1024);
    } catch { /* process gone */ }
  }
  return peak;
}

console.log(`| format | records | MB | s | records/s | peak renderer MB |`);
console.log(`|--------|--------:|---:|--:|----------:|-----------------:|`);
for (const format of formats) {
  // A fresh browser per run, so its peak memory is this run's alone.
  const browser = await launchWithProfile();
  const page = await browser.newPage();
  await page.goto(`${web.url}/tests/js/support/blank.html`);
  const token = cli(["token", "create", "--user", "user_456", "--company", "company_123"]);
  const r = await page.evaluate(async ({ baseUrl, token, format, opts }) => {
    const { default: init, exportData } = await import("/pkg/handover.js");
    await init();
    const t0 = performance.now();
    const res = await exportData({ baseUrl, token, companyId: "company_123", format,
      dataTypes: ["payment_history"], download: false, pageSize: 5000, ...opts });
    const out = { s: (performance.now() - t0) / 1000, records: res.recordCount, bytes: res.byteSize, stats: res.stats };
    await res.release();
    return out;
  }, { baseUrl: server.url, token, format, opts: process.env.BENCH_OPTS ? JSON.parse(process.env.BENCH_OPTS) : {} });
  const peak = rendererPeakMb();
  await browser.close();
  console.log(`| ${format.padEnd(6)} | ${String(r.records).padStart(7)} | ${(r.bytes / 1048576).toFixed(1)} | ${r.s.toFixed(1)} | ${Math.round(r.records / r.s)} | ${peak.toFixed(0)} |`, JSON.stringify(r.stats));
}
await web.close();
await server.stop();
rmSync(dir, { recursive: true, force: true });
