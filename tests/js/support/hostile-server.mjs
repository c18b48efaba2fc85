// A hostile export server for the browser tests: it answers like
// handover-server, but the bearer token picks how it misbehaves:
//   cycle      record cursors that lead back (a → b → a)
//   elsewhere  a records_url on another origin (localhost instead of 127.0.0.1)
//   backslash  a records_url "/\localhost:…", which the URL parser reads as "//localhost:…"
//   tab        a records_url "/<tab>/localhost:…", the same once the tab is stripped
//   huge       a create answer announcing 80 MiB
//   more       more records than the manifest announces, each frame with a fresh cursor
//   endless    a create answer of up to 200 MiB without a length (chunked)
//   trickle    a create answer without a length, one byte every 20 ms, for
//              up to 10 s: alive all along, never finished in time
// GET /__seen lists the requests it received, so a test can check that
// nothing (least of all the token) went where it must not.
import { createServer } from "node:http";

const CORS = {
  "access-control-allow-origin": "*",
  "access-control-allow-headers": "authorization, content-type, x-company-id, idempotency-key, upload-offset",
  "access-control-allow-methods": "GET, POST, PATCH, DELETE",
};

export async function startHostile() {
  const seen = [];
  const pending = [];
  let port;
  const server = createServer((req, res) => {
    if (req.method === "OPTIONS") {
      res.writeHead(204, CORS);
      res.end();
      return;
    }
    const url = new URL(req.url, "http://127.0.0.1");
    const json = (status, body) => {
      res.writeHead(status, { ...CORS, "content-type": "application/json" });
      res.end(JSON.stringify(body));
    };
    // Once the answers still being written have ended.
    if (url.pathname === "/__seen") return void Promise.all(pending).then(() => json(200, seen));
    const token = (req.headers.authorization ?? "").replace(/^Bearer /, "");
    seen.push({ method: req.method, host: req.headers.host, path: url.pathname, token });
    if (req.method === "POST" && url.pathname === "/api/data/export") {
      if (token === "huge") {
        res.writeHead(201, { ...CORS, "content-type": "application/json", "content-length": String(80 << 20) });
        res.write("{");
        // Never finished: the client must refuse on the announced size.
        setTimeout(() => res.destroy(), 10_000).unref();
        return;
      }
      if (token === "endless") {
        res.writeHead(201, { ...CORS, "content-type": "application/json" });
        const mib = Buffer.alloc(1 << 20, 0x20);
        let closed = false;
        const hungUp = new Promise((ok) => res.on("close", () => { closed = true; ok(); }));
        // Bounded: 200 MiB at most, or until the client hangs up; /__seen
        // then says how far it got ("endless" with `finished`).
        const stuck = new Promise((ok) => setTimeout(ok, 10_000).unref());
        pending.push((async () => {
          res.write("{");
          let sent = 0;
          while (sent < 200 && !closed) {
            sent++;
            if (!res.write(mib)) await Promise.race([new Promise((ok) => res.once("drain", ok)), hungUp, stuck]);
          }
          if (!closed) res.end("}");
          seen.push({ method: "END", host: "", path: "/__endless", token, mib: sent, finished: !closed });
        })());
        return;
      }
      if (token === "trickle") {
        res.writeHead(201, { ...CORS, "content-type": "application/json" });
        let closed = false;
        res.on("close", () => { closed = true; });
        // Bounded: 500 bytes at most, or until the client hangs up.
        pending.push((async () => {
          let sent = 0;
          while (sent < 500 && !closed) {
            res.write(sent === 0 ? "{" : " ");
            sent++;
            await new Promise((ok) => setTimeout(ok, 20));
          }
          if (!closed) res.end("}");
          seen.push({ method: "END", host: "", path: "/__trickle", token, bytes: sent, finished: !closed });
        })());
        return;
      }
      const t = { records: token === "more" ? 3 : 1_000_000, columns: [{ name: "id", kind: "string" }] };
      if (token === "elsewhere") t.records_url = `http://localhost:${port}/steal/records`;
      if (token === "backslash") t.records_url = `/\\localhost:${port}/steal/records`;
      if (token === "tab") t.records_url = `/\t/localhost:${port}/steal/records`;
      return json(201, {
        success: true,
        data: {
          request_id: "export_hostile",
          manifest: { t },
          export_info: { request_id: "export_hostile", generated_at: "2026-01-01T00:00:00Z" },
        },
      });
    }
    if (req.method === "GET" && url.pathname === "/api/data/export/export_hostile/records/t/stream") {
      res.writeHead(200, { ...CORS, "content-type": "application/x-ndjson" });
      const frame = (offset, id, next) => JSON.stringify({ data_type: "t", offset, rows: [[id]], next_cursor: next }) + "\n";
      if (token === "more") {
        // Six records for a manifest of three, every cursor new.
        res.end([0, 1, 2, 3, 4, 5].map((i) => frame(i, `r${i}`, i < 5 ? `c${i}` : null)).join(""));
        return;
      }
      // One record per frame, the cursors going round: a → b → a → …
      res.end(frame(0, "r0", "a") + frame(1, "r1", "b") + frame(2, "r2", "a") + frame(3, "r3", "b"));
      return;
    }
    if (req.method === "POST" && url.pathname.endsWith("/fail")) return json(200, { success: true, data: {} });
    json(404, { success: false, error: { code: "NOT_FOUND", error: "no such path" } });
  });
  await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
  port = server.address().port;
  return {
    url: `http://127.0.0.1:${port}`,
    stop: () => new Promise((ok) => { server.closeAllConnections?.(); server.close(() => ok()); }),
  };
}
