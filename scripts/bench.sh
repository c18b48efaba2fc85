#!/usr/bin/env bash
# Benchmarks, as markdown tables; every figure beside an anchor measured in
# the same run (these machines are noisy: absolute times mislead).
#
#   1. the server: CLI exports, every record through the HTTP API, a
#      streaming conversion, many users paging at once
#      (benches/server.py; anchors: `sqlite3 -csv` of the same query and
#      rust_xlsxwriter alone);
#   2. the format writers natively;
#   3. exportData in headless Chromium against a release server.
#
# BENCH_RECORDS (default 1000000) sizes the demo user; BENCH_REPEAT (3) the
# runs per figure (the median is printed).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
cargo build -q --release -p handover-server --bins --examples
cargo build -q --release -p handover --example bench_formats

echo "## Server"
echo
python3 benches/server.py

echo
echo "## Format writers (native, one process per row)"
echo
echo "| format | records | MB out | s | records/s | MB/s | peak MB |"
echo "|--------|--------:|-------:|--:|----------:|-----:|--------:|"
for n in ${BENCH_SIZES:-1000000}; do
  for f in json csv xlsx; do
    target/release/examples/bench_formats "$f" "$n"
  done
done

echo
echo "## exportData in Chromium"
echo
scripts/build-pkg.sh > /dev/null
node benches/browser.mjs
