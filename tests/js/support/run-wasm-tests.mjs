// Runs the wasm-bindgen browser tests of exportData against real servers:
// one clean, one that injects faults (500s, 429s, dropped connections)
// into a third of the record pages, one that fails every page and one whose
// pages never finish, all on the same database; and a hostile impostor
// (tests/js/support/hostile-server.mjs). Server
// URLs and tokens reach the tests as compile-time environment variables.
import { spawn } from "node:child_process";
import { makeDatabase, makeToken, companyOf, startServer, removeDatabase, ROOT } from "./server.mjs";
import { startHostile } from "./hostile-server.mjs";

const db = makeDatabase({ users: 14, records: 300 });
const clean = await startServer(db);
const faulty = await startServer(db, { extraEnv: { HANDOVER_FAULT_PAGES: "0.3" } });
const broken = await startServer(db, { extraEnv: { HANDOVER_FAULT_PAGES: "1" } });
const stalled = await startServer(db, { extraEnv: { HANDOVER_FAULT_PAGES: "1", HANDOVER_FAULT_KIND: "stall" } });
const hostile = await startHostile();
const tokens = {};
for (let n = 1; n <= 14; n++) {
  const user = `user_${String(n).padStart(4, "0")}`;
  tokens[user] = { token: makeToken(db, user, companyOf(n)), company: companyOf(n) };
}
let status = 1;
try {
  // An async child: the servers' log pipes must keep draining while the
  // tests run (a blocked event loop would stall the servers on a full pipe).
  const child = spawn(
    "cargo",
    ["test", "-p", "handover", "--target", "wasm32-unknown-unknown", "--test", "browser_export", ...process.argv.slice(2)],
    {
      cwd: ROOT,
      stdio: "inherit",
      env: {
        ...process.env,
        HANDOVER_TEST_SERVER: clean.url,
        HANDOVER_TEST_FAULTY_SERVER: faulty.url,
        HANDOVER_TEST_BROKEN_SERVER: broken.url,
        HANDOVER_TEST_STALLED_SERVER: stalled.url,
        HANDOVER_TEST_HOSTILE_SERVER: hostile.url,
        HANDOVER_TEST_TOKENS: JSON.stringify(tokens),
        CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER: "wasm-bindgen-test-runner",
        // The whole headless run must finish within this (default 20 s); the
        // fault tests wait out injected 429s.
        WASM_BINDGEN_TEST_TIMEOUT: process.env.WASM_BINDGEN_TEST_TIMEOUT ?? "300",
        CHROMEDRIVER: process.env.CHROMEDRIVER ?? "/usr/bin/chromedriver",
      },
    },
  );
  status = await new Promise((ok) => child.on("exit", (code) => ok(code ?? 1)));
} finally {
  await clean.stop();
  await faulty.stop();
  await broken.stop();
  await stalled.stop();
  await hostile.stop();
  removeDatabase(db);
}
process.exit(status);
