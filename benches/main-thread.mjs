// What the demo page's main thread does during an export, from a Chromium
// trace: how many tasks it ran, their CPU time, and for the longest ones
// their wall time beside their CPU time. A long task with little CPU in it
// was waiting for a core (the machine was busy), not working.
//
//   node benches/main-thread.mjs   (after scripts/build-pkg.sh and a release
//   build of handover-server; BENCH_RECORDS, default 1000000, sizes the user;
//   BENCH_FORMATS, default "csv,xlsx")
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { launchWithProfile } from "../tests/js/support/chromium.mjs";
import { startServer, ROOT } from "../tests/js/support/server.mjs";

const BIN = join(ROOT, "target/release/handover-server");
const dir = mkdtempSync(join(tmpdir(), "handover-main-thread-"));
const env = { DATABASE_URL: `sqlite://${join(dir, "demo.db")}`, HANDOVER_DATA_DIR: join(dir, "data"), HANDOVER_MASTER_KEY: "22".repeat(32) };
execFileSync(BIN, ["demo-data", "--users", "0", "--records", String(process.env.BENCH_RECORDS ?? 1_000_000)],
  { env: { ...process.env, ...env }, stdio: "ignore" });
const db = { dir, env, file: join(dir, "demo.db") };
const CATEGORIES = ["toplevel", "devtools.timeline", "disabled-by-default-devtools.timeline", "v8.execute", "blink"];

/** The page's main thread's tasks in `events` (a trace), longest first. */
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

const demo = await startServer(db, { extraEnv: { HANDOVER_LOG: "info" }, bin: BIN, args: ["--demo", "--www-dir", join(ROOT, "www"), "--pkg-dir", join(ROOT, "pkg")] });
try {
  console.log("| format | tasks | CPU ms | longest tasks: wall / CPU ms (what) |");
  console.log("|---|--:|--:|---|");
  for (const format of (process.env.BENCH_FORMATS ?? "csv,xlsx").split(",")) {
    execFileSync("sqlite3", ["-cmd", ".timeout 10000", db.file, "DELETE FROM rate_events; DELETE FROM export_requests;"]);
    const browser = await launchWithProfile({ acceptDownloads: true });
    try {
      const page = await browser.newPage();
      await page.goto(demo.url);
      await page.waitForSelector("body[data-ready=true]", { timeout: 60000 });
      const cdp = await browser.newCDPSession(page);
      const events = [];
      cdp.on("Tracing.dataCollected", (e) => events.push(...e.value));
      const complete = new Promise((ok) => cdp.once("Tracing.tracingComplete", ok));
      await cdp.send("Tracing.start", { transferMode: "ReportEvents", traceConfig: { includedCategories: CATEGORIES } });
      await page.check(`input[name=format][value=${format}]`);
      await Promise.all([page.waitForEvent("download", { timeout: 600000 }), page.click("#export-button")]);
      await page.waitForFunction(() => document.querySelector("#status").classList.contains("ok"), null, { timeout: 60000 });
      await cdp.send("Tracing.end");
      await complete;
      const tasks = mainThreadTasks(events);
      const cpu = tasks.reduce((s, t) => s + t.cpu, 0);
      const longest = tasks.slice(0, 3).map((t) => `${t.wall.toFixed(1)} / ${t.cpu.toFixed(1)} (${t.source})`).join(", ");
      console.log(`| ${format} | ${tasks.length} | ${cpu.toFixed(0)} | ${longest} |`);
    } finally {
      await browser.close();
    }
  }
} finally {
  await demo.stop();
  rmSync(dir, { recursive: true, force: true });
}
