#!/usr/bin/env bash
# Benchmarks, as tables: the format writers natively (release build; sizes
# via BENCH_SIZES, default "100000 1000000"), then exportData in headless
# Chromium against a release handover-server for one user with about
# BENCH_RECORDS (default 1000000) payments.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release -p handover --example bench_formats
echo "| format | records | MB out | s | records/s | MB/s | peak MB |"
echo "|--------|--------:|-------:|--:|----------:|-----:|--------:|"
for n in ${BENCH_SIZES:-100000 1000000}; do
  for f in json csv xlsx; do
    target/release/examples/bench_formats "$f" "$n"
  done
done

echo
cargo build -q --release -p handover-server
scripts/build-pkg.sh > /dev/null
node benches/browser-export.mjs
