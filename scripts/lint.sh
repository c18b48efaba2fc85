#!/usr/bin/env bash
# Lints: rustfmt and clippy with warnings as errors, natively (all targets)
# and for wasm32 (the handover crate). Kept apart from scripts/test.sh so
# that CI's clean build stays well inside its time budget; run it before
# every commit.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy -p handover --target wasm32-unknown-unknown --all-targets -- -D warnings
echo "lint clean"
