// Starts real handover-server processes for the browser tests: a temp
// SQLite database with demo data, API tokens made with the CLI, a free
// port on 127.0.0.1. Every wait here is bounded.
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, existsSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
export const BIN = join(ROOT, "target", "debug", "handover-server");

function cli(env, args) {
  return execFileSync(BIN, args, { env: { ...process.env, ...env }, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] }).trim();
}

/** A fresh database with demo data (of `config`, a data type config, when
 * given); returns { dir, env }. */
export function makeDatabase({ users = 12, records = 300, config = null } = {}) {
  if (!existsSync(BIN)) throw new Error(`${BIN} is missing: run cargo build -p handover-server`);
  const dir = mkdtempSync(join(tmpdir(), "handover-test-"));
  const env = {
    DATABASE_URL: `sqlite://${join(dir, "handover.db")}`,
    HANDOVER_DATA_DIR: join(dir, "data"),
    HANDOVER_MASTER_KEY: "11".repeat(32),
    HANDOVER_LOG: "warn",
    ...(config ? { HANDOVER_DATA_TYPES: config } : {}),
  };
  cli(env, ["demo-data", "--users", String(users), "--records", String(records)]);
  return { dir, env };
}

/** An API token for `user` in `company` (data:export unless told). */
export function makeToken(db, user, company, permissions = ["data:export"]) {
  return cli(db.env, ["token", "create", "--user", user, "--company", company, ...permissions.flatMap((p) => ["--permission", p])]);
}

/** Generated demo users are user_0001… in company_456, company_789, company_123, … in turn. */
export function companyOf(n) {
  return ["company_123", "company_456", "company_789"][n % 3];
}

/**
 * Starts `handover-server serve` on a free port. `extraEnv` adds settings
 * (HANDOVER_FAULT_PAGES, HANDOVER_DEMO, …); `args` extra flags.
 * Resolves to { url, token (demo mode), stop() }.
 */
export function startServer(db, { extraEnv = {}, args = [], timeoutMs = 30000, bin = BIN } = {}) {
  return new Promise((resolve, reject) => {
    const child = spawn(bin, ["serve", "--bind", "127.0.0.1:0", ...args], {
      env: { ...process.env, ...db.env, HANDOVER_CORS_ORIGINS: "*", HANDOVER_LOG: "info", ...extraEnv },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let out = "";
    let settled = false;
    const timer = setTimeout(() => {
      if (!settled) {
        settled = true;
        child.kill("SIGKILL");
        reject(new Error(`handover-server did not start in ${timeoutMs} ms:\n${out}`));
      }
    }, timeoutMs);
    const stop = () =>
      new Promise((ok) => {
        if (child.exitCode !== null) return ok();
        child.once("exit", () => ok());
        child.kill("SIGTERM");
      });
    const onData = (chunk) => {
      // Keep only the tail: the servers log every request.
      out = (out + chunk.toString()).slice(-200_000);
      // eslint-disable-next-line no-control-regex
      const plain = out.replace(/\x1b\[[0-9;]*m/g, "");
      const m = /listening\s+addr=(127\.0\.0\.1:\d+)/.exec(plain);
      const demo = args.includes("--demo") || extraEnv.HANDOVER_DEMO;
      const token = /demo token \([^)]*\): (hov_\S+)/.exec(plain)?.[1];
      if (!settled && m && (!demo || token)) {
        settled = true;
        clearTimeout(timer);
        resolve({ url: `http://${m[1]}`, token, stop, child, log: () => out });
      }
    };
    child.stdout.on("data", onData);
    child.stderr.on("data", onData);
    child.on("exit", (code) => {
      if (!settled) {
        settled = true;
        clearTimeout(timer);
        reject(new Error(`handover-server exited with ${code}:\n${out}`));
      }
    });
  });
}

export function removeDatabase(db) {
  rmSync(db.dir, { recursive: true, force: true });
}
