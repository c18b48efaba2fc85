#!/usr/bin/env python3
"""Server-side benchmarks of handover, as markdown tables.

Every time is the median of BENCH_REPEAT runs (default 3) and is printed
beside a ratio to an anchor measured in the same run, because absolute
times on a shared 2-core machine mislead:

- `sqlite3 -csv` of the data type's own query (the database's own speed),
- rust_xlsxwriter alone in constant-memory mode, writing the same rows.

Needs the release builds made by scripts/bench.sh. Every loop is bounded;
every server is on 127.0.0.1 and stopped at the end.
"""

import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "handover-server")
EXAMPLES = os.path.join(ROOT, "target", "release", "examples")
RECORDS = int(os.environ.get("BENCH_RECORDS", "1000000"))
REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))
LOAD_USERS = int(os.environ.get("BENCH_LOAD_USERS", "60"))
MASTER = "22" * 32
QUERY = ("SELECT id, user_id, membership_id, amount_cents, currency, status, payment_method, "
         "failure_reason, created_at FROM demo_payments "
         "WHERE user_id = 'user_456' AND company_id = 'company_123' ORDER BY id")


def run(args, env=None):
    """Runs a command; returns (seconds, peak RSS in MB, stdout)."""
    cmd = ["/usr/bin/time", "-f", "TIME %e %M"] + args
    p = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{p.stderr[-2000:]}")
    m = re.search(r"TIME ([\d.]+) (\d+)", p.stderr)
    return float(m.group(1)), int(m.group(2)) / 1024, p.stdout


def median_run(args, env=None, repeat=REPEAT, fresh=None):
    """The median of `repeat` runs; `fresh` (a path) is removed before each,
    for commands that refuse to overwrite their output."""
    def once():
        if fresh and os.path.exists(fresh):
            os.remove(fresh)
        return run(args, env)
    runs = [once() for _ in range(repeat)]
    return statistics.median(r[0] for r in runs), max(r[1] for r in runs), runs[-1][2]


class Server:
    """handover-server serve on a free port, as a child process."""

    def __init__(self, env):
        self.proc = subprocess.Popen([BIN, "serve", "--bind", "127.0.0.1:0"],
                                     env={**os.environ, **env, "HANDOVER_LOG": "info"},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 30
        self.url = None
        while time.time() < deadline and self.url is None:
            line = self.proc.stdout.readline()
            if not line:
                break
            m = re.search(r"listening\s+addr=(127\.0\.0\.1:\d+)", re.sub(r"\x1b\[[0-9;]*m", "", line))
            if m:
                self.url = f"http://{m.group(1)}"
        if self.url is None:
            self.stop()
            sys.exit("handover-server did not start")
        # Keep draining the log so the server never blocks on a full pipe.
        import threading
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def token(env, user, company):
    return subprocess.run([BIN, "token", "create", "--user", user, "--company", company],
                          env={**os.environ, **env}, capture_output=True, text=True, check=True).stdout.strip()


def bench_http(*args):
    return subprocess.run([os.path.join(EXAMPLES, "bench_http"), *args],
                          capture_output=True, text=True, check=True).stdout.strip()


SECTIONS = set(os.environ.get("BENCH_SERVER_SECTIONS", "export,load,flood").split(","))


def main():
    tmp = tempfile.mkdtemp(prefix="handover-bench-")
    try:
        if "export" in SECTIONS:
            export_section(tmp)
        if "load" in SECTIONS:
            load_section(tmp)
        if "flood" in SECTIONS:
            flood_section(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_section(tmp):
    db = os.path.join(tmp, "bench.db")
    env = {"DATABASE_URL": f"sqlite://{db}", "HANDOVER_DATA_DIR": os.path.join(tmp, "data"),
           "HANDOVER_MASTER_KEY": MASTER}
    load_s, _, _ = run([BIN, "demo-data", "--users", "0", "--records", str(RECORDS)], env)
    n = subprocess.run(["sqlite3", db, "SELECT COUNT(*) FROM demo_payments WHERE user_id='user_456' AND company_id='company_123'"],
                       capture_output=True, text=True, check=True).stdout.strip()
    print(f"One user with {int(n):,} payments ({RECORDS:,} demo records loaded in {load_s:.1f} s); "
          f"median of {REPEAT} runs each.\n")

    anchor_s, _, _ = median_run(["sqlite3", "-csv", "-header", db, QUERY])
    xs = [subprocess.run([os.path.join(EXAMPLES, "anchor_xlsx"), db, "user_456", "company_123",
                          os.path.join(tmp, "anchor.xlsx")], capture_output=True, text=True, check=True).stdout.split()
          for _ in range(REPEAT)]
    xlsx_anchor = statistics.median(float(x[0]) for x in xs)

    print("| path | s | × `sqlite3 -csv` | × rust_xlsxwriter constant-memory | peak RSS MB | MB out |")
    print("|---|--:|--:|--:|--:|--:|")
    print(f"| `sqlite3 -csv` of the same query (anchor) | {anchor_s:.2f} | 1.00 | | | |")
    print(f"| rust_xlsxwriter alone, constant memory, default level (anchor) | {xlsx_anchor:.2f} | "
          f"{xlsx_anchor / anchor_s:.2f} | 1.00 | | {os.path.getsize(os.path.join(tmp, 'anchor.xlsx')) / 2**20:.1f} |")
    for fmt in ("csv", "json", "xlsx"):
        out = os.path.join(tmp, f"out.{fmt}")
        s, rss, _ = median_run([BIN, "export", "--user", "user_456", "--company", "company_123",
                                "--format", fmt, "--data-types", "payment_history", "--out", out], env, fresh=out)
        x = f"{s / xlsx_anchor:.2f}" if fmt == "xlsx" else ""
        print(f"| CLI export {fmt} | {s:.2f} | {s / anchor_s:.2f} | {x} | {rss:.0f} | {os.path.getsize(out) / 2**20:.1f} |")

    server = Server(env)
    try:
        t = token(env, "user_456", "company_123")
        print()
        print("All the user's payments through the HTTP API (no browser): one create, then the "
              "records as one stream per data type, or as pages of 5000.\n")
        print("| path | Accept-Encoding | records | s | × `sqlite3 -csv` | MB on the wire | MB decoded |")
        print("|---|---|--:|--:|--:|--:|--:|")
        for mode, enc in (("stream", "zstd"), ("stream", "gzip"), ("stream", "identity"), ("pages", "zstd")):
            rows = []
            for _ in range(REPEAT):
                # Each run creates an export: more than the five an hour a user may.
                subprocess.run(["sqlite3", "-cmd", ".timeout 10000", db, "DELETE FROM rate_events"], check=True)
                rows.append(bench_http(mode, server.url, t, "company_123", enc, "payment_history"))
            cells = [r.strip("|").split("|") for r in rows]
            s = statistics.median(float(c[3]) for c in cells)
            c = cells[-1]
            print(f"| {c[0].strip()} | {enc} | {c[2].strip()} | {s:.2f} | {s / anchor_s:.2f} | {c[5].strip()} | {c[6].strip()} |")
        metrics = subprocess.run(["curl", "-s", f"{server.url}/metrics"], capture_output=True, text=True).stdout
        bk = dict(re.findall(r"^handover_page_bookkeeping_seconds_(sum|count) ([\d.e+-]+)$", metrics, re.M))
        if bk and float(bk.get("count", 0)) > 0:
            print(f"\nPer-page bookkeeping (progress row): {float(bk['sum']) / float(bk['count']) * 1000:.2f} ms "
                  f"a page over {int(float(bk['count']))} pages and frames.")
        print()
        print("| conversion | build s | download s | MB | server RSS before MB | RSS growth during the download MB |")
        print("|---|--:|--:|--:|--:|--:|")
        print(bench_http("convert", server.url, t, "company_123", str(server.proc.pid)))
    finally:
        server.stop()


def load_section(tmp):
    # Many users at once, each with about 20,000 records.
    ldb = os.path.join(tmp, "load.db")
    lenv = {"DATABASE_URL": f"sqlite://{ldb}", "HANDOVER_DATA_DIR": os.path.join(tmp, "data2"),
            "HANDOVER_MASTER_KEY": MASTER}
    run([BIN, "demo-data", "--users", str(LOAD_USERS), "--records", "20000"], lenv)
    companies = ["company_123", "company_456", "company_789"]
    tokens = os.path.join(tmp, "tokens.txt")
    with open(tokens, "w") as f:
        for i in range(1, LOAD_USERS + 1):
            c = companies[i % 3]
            f.write(f"{token(lenv, f'user_{i:04d}', c)} {c}\n")
    server = Server(lenv)
    try:
        print()
        print("| load | page requests | records | s | records/s | p50 ms | p99 ms | errors |")
        print("|---|--:|--:|--:|--:|--:|--:|--:|")
        print(bench_http("load", server.url, tokens, "1", "SQLite, 1 instance: "))
        print(bench_http("load", server.url, tokens, str(LOAD_USERS), "SQLite, 1 instance: "))
    finally:
        server.stop()
    load_postgres(tmp, companies)


def flood_section(tmp):
    """An authenticated call's p99 alone and during an unauthenticated flood."""
    fdb = os.path.join(tmp, "flood.db")
    fenv = {"DATABASE_URL": f"sqlite://{fdb}", "HANDOVER_DATA_DIR": os.path.join(tmp, "data4"),
            "HANDOVER_MASTER_KEY": MASTER}
    run([BIN, "demo-data", "--users", "3", "--records", "200"], fenv)
    server = Server(fenv)
    try:
        # A user for each of the four measurements (the per-user read limit).
        users = [("user_456", "company_123"), ("user_0001", "company_456"),
                 ("user_0002", "company_789"), ("user_0003", "company_123")]
        args = [a for u, c in users for a in (token(fenv, u, c), c)]
        print()
        print("An authenticated call (`GET /api/data/summary`) while 32 clients flood the API with "
              "unauthenticated requests with 30 KB paths, from the same address: calls one after "
              "another from the flood's onset, then calls paced over two seconds of it, each "
              "beside the same pattern alone:\n")
        print("| authenticated calls | n | flood requests answered | p50 ms | p99 ms | p99 × alone | errors |")
        print("|---|--:|--:|--:|--:|--:|--:|")
        print(bench_http("flood", server.url, *args))
    finally:
        server.stop()


def load_postgres(tmp, companies):
    """The same load on PostgreSQL: one instance, then two sharing the database."""
    # Its own directory under /tmp: the cluster runs as the postgres user,
    # which cannot enter this benchmark's private temporary directory.
    cluster = tempfile.mkdtemp(prefix="handover-pg-")
    admin = subprocess.run([os.path.join(ROOT, "scripts", "pg-cluster.sh"), "start", cluster],
                           capture_output=True, text=True, check=True).stdout.strip()
    try:
        subprocess.run(["psql", admin, "-qc", "CREATE DATABASE bench"], check=True, capture_output=True)
        url = admin.rsplit("/", 1)[0] + "/bench"
        penv = {"DATABASE_URL": url, "HANDOVER_DATA_DIR": os.path.join(tmp, "data3"), "HANDOVER_MASTER_KEY": MASTER}
        run([BIN, "demo-data", "--users", str(LOAD_USERS), "--records", "20000"], penv)
        tokens = os.path.join(tmp, "pg-tokens.txt")
        with open(tokens, "w") as f:
            for i in range(1, LOAD_USERS + 1):
                c = companies[i % 3]
                f.write(f"{token(penv, f'user_{i:04d}', c)} {c}\n")
        one = Server(penv)
        try:
            print(bench_http("load", one.url, tokens, str(LOAD_USERS), "PostgreSQL, 1 instance: "))
            # New exports for the second run: the rate limit allows five an hour.
            subprocess.run(["psql", url, "-qc", "DELETE FROM rate_events"], check=True, capture_output=True)
            two = Server(penv)
            try:
                print(bench_http("load", f"{one.url},{two.url}", tokens, str(LOAD_USERS), "PostgreSQL, 2 instances: "))
            finally:
                two.stop()
        finally:
            one.stop()
        print()
        print("Two instances share this machine's two cores with PostgreSQL and the load generator, "
              "so the second instance shows that they cooperate (exact limits, one audit chain), not added capacity.")
    finally:
        subprocess.run([os.path.join(ROOT, "scripts", "pg-cluster.sh"), "stop", cluster], check=False)


if __name__ == "__main__":
    main()
