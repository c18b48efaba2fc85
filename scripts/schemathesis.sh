#!/usr/bin/env bash
# Schemathesis against the live OpenAPI document: a server on a fresh
# SQLite database with demo data, every operation fuzzed from its schema
# (examples, coverage and fuzzing phases, a fixed seed so that CI is
# reproducible), checking for 0 server errors and 0 responses that break
# the document (schema, status codes, content types, headers).
# Usage: scripts/schemathesis.sh [SERVER_BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/debug/handover-server}
command -v st >/dev/null || { echo "schemathesis (st) is missing: run scripts/setup.sh" >&2; exit 1; }
dir=$(mktemp -d /tmp/handover-st.XXXXXX)
export DATABASE_URL="sqlite://$dir/h.db" HANDOVER_DATA_DIR="$dir/data" HANDOVER_LOG=warn
export HANDOVER_MASTER_KEY=4444444444444444444444444444444444444444444444444444444444444444
"$bin" demo-data --users 2 --records 100 >/dev/null 2>&1
token=$("$bin" token create --user user_456 --company company_123 --permission data:export --permission audit:read 2>/dev/null)
HANDOVER_LOG=info NO_COLOR=1 "$bin" serve --bind 127.0.0.1:0 >"$dir/server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
addr=""
for _ in $(seq 1 100); do
  addr=$(sed -n 's/.*listening addr=\(127\.0\.0\.1:[0-9]*\).*/\1/p' "$dir/server.log" | head -1)
  [ -n "$addr" ] && break
  kill -0 $pid 2>/dev/null || { cat "$dir/server.log" >&2; exit 1; }
  sleep 0.1
done
[ -n "$addr" ] || { echo "the server did not start" >&2; cat "$dir/server.log" >&2; exit 1; }
st run "http://$addr/api/openapi.json" \
  -H "Authorization: Bearer $token" -H "X-Company-ID: company_123" \
  --phases examples,coverage,fuzzing --max-examples 25 --seed 20261130 \
  --checks not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance,response_headers_conformance
if grep -q panicked "$dir/server.log"; then
  echo "the server panicked during the run:" >&2
  grep -A5 panicked "$dir/server.log" >&2
  exit 1
fi
