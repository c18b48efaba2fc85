#!/usr/bin/env bash
# Benchmarks of the format writers (release build), as a table. Sizes via
# BENCH_SIZES (default "100000 1000000").
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
