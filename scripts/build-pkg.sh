#!/usr/bin/env bash
# Builds the npm package into pkg/: wasm-pack (release, --target web) with
# npm's wasm-opt, then scripts/finish-pkg.mjs completes package.json and
# re-exports the ExportError class.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/node_modules/.bin:$PATH"
# Nothing stale from an earlier build ships.
rm -rf pkg
wasm-pack build --release --target web --out-dir pkg --out-name handover --no-pack . 2>&1 \
  | grep -v -e "failed to get wasm-pack version" || true
[ -f pkg/handover_bg.wasm ] || { echo "[build-pkg] FAILED: wasm-pack produced no pkg/handover_bg.wasm" >&2; exit 1; }
node scripts/finish-pkg.mjs
