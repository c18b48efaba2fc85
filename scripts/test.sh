#!/usr/bin/env bash
# Runs every test of handover: formatting, native unit, doc, golden-file
# and server integration tests (on SQLite, then on PostgreSQL), wasm tests
# in headless Chromium, the release package in Chromium, and the end-to-end
# tests. Installs what is missing first (scripts/setup.sh). Clippy runs in
# scripts/lint.sh (a second full compile of every crate; kept out of CI's
# clean build for time).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
step() { printf '\n\033[1;34m==> %s\033[0m (%ss)\n' "$*" "$(( $(date +%s) - start ))"; }

step "setup"
scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "native tests (unit, doc, golden files, server over HTTP on SQLite)"
cargo test --workspace

step "the server suite again, on PostgreSQL (a throwaway cluster)"
pg_dir=$(mktemp -d /tmp/handover-pg.XXXXXX)
trap 'scripts/pg-cluster.sh stop "$pg_dir"' EXIT
pg_url=$(scripts/pg-cluster.sh start "$pg_dir")
HANDOVER_TEST_POSTGRES="$pg_url" cargo test -p handover-server --test api
scripts/pg-cluster.sh stop "$pg_dir"
trap - EXIT

step "examples"
# Built by the workspace test run above (same features, no second compile).
target/debug/examples/format_records > /dev/null

step "wasm tests of formatRecords in headless Chromium"
CHROMEDRIVER=$(command -v chromedriver) \
CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner WASM_BINDGEN_TEST_TIMEOUT=300 \
  cargo test -p handover --target wasm32-unknown-unknown --test browser_format

step "wasm tests of exportData in headless Chromium against real servers (one injecting faults)"
# The server binary the integration tests ran is the one the browser tests use.
test -x target/debug/handover-server || { echo "target/debug/handover-server was not built by cargo test" >&2; exit 1; }
node tests/js/support/run-wasm-tests.mjs

step "schemathesis against /api/openapi.json (0 server errors, 0 responses off the document)"
scripts/schemathesis.sh target/debug/handover-server

step "release package (pkg/)"
scripts/build-pkg.sh

step "release package, bundler and end-to-end tests in Chromium (node --test, playwright-core)"
node --test --test-concurrency=1 tests/js/*.test.mjs

step "all tests passed in $(( $(date +%s) - start ))s"
