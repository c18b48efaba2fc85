#!/usr/bin/env bash
# Installs what building, testing and benchmarking handover needs, skipping
# what is there: the wasm32 target, wasm-bindgen-cli at the Cargo.lock
# version, wasm-pack, Debian chromium + chromium-driver and sqlite3, the npm
# dev packages (including a working wasm-opt from npm's binaryen) and
# Python's openpyxl.
# Safe to run again; a second run takes a second or two.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1;34m[setup]\033[0m %s\n' "$*"; }
die() { printf '\033[1;31m[setup] FAILED:\033[0m %s\n' "$*" >&2; exit 1; }

command -v cargo >/dev/null || die "cargo is not installed: install Rust with rustup first (https://rustup.rs)"
command -v npm >/dev/null || die "npm is not installed: install Node.js 18 or newer"

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
  say "adding the wasm32-unknown-unknown target"
  rustup target add wasm32-unknown-unknown || die "rustup could not add wasm32-unknown-unknown"
fi
for c in clippy rustfmt; do
  rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c" || die "rustup could not add $c"
done

# wasm-bindgen's CLI must match the wasm-bindgen crate in Cargo.lock exactly.
want=$(awk '/^name = "wasm-bindgen"$/ {getline; gsub(/version = |"/, ""); print; exit}' Cargo.lock)
[ -n "$want" ] || die "could not read the wasm-bindgen version from Cargo.lock"
have=$(wasm-bindgen --version 2>/dev/null | awk '{print $2}' || true)
if [ "$have" != "$want" ]; then
  say "installing wasm-bindgen-cli $want (found: ${have:-none}; takes ~3 min once)"
  # Without --locked: its lock file pins a crate this registry mirror lacks.
  cargo install wasm-bindgen-cli --version "$want" --force || die "cargo install wasm-bindgen-cli $want failed"
fi

if ! command -v wasm-pack >/dev/null; then
  say "installing wasm-pack (takes ~2 min once)"
  cargo install wasm-pack --locked || die "cargo install wasm-pack failed"
fi

# Debian packages: Chromium for the browser tests, PostgreSQL for the
# server suite's second engine, sqlite3 for the
# benchmark's anchor.
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v sqlite3 >/dev/null || missing+=(sqlite3)
# PostgreSQL: the server suite also runs against a throwaway cluster.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
fi
# Debian's binaryen (wasm-opt 108) silently breaks wasm-bindgen output; we use npm's.

stamp=node_modules/.package-lock.sha
sum=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sum" ]; then
  say "installing npm dev packages (binaryen, esbuild, playwright-core, typescript; papaparse, xlsx and wasm-xlsxwriter for the benchmark)"
  npm ci --no-audit --no-fund --loglevel=error || die "npm ci failed"
  echo "$sum" > "$stamp"
fi
node_modules/.bin/wasm-opt --version >/dev/null || die "wasm-opt from npm's binaryen does not run"

if ! python3 -c 'import openpyxl' 2>/dev/null; then
  say "installing Python openpyxl (reads exported XLSX in the end-to-end tests)"
  python3 -m pip install --quiet openpyxl || die "pip install openpyxl failed"
fi
if ! command -v st >/dev/null || ! st --version 2>/dev/null | grep -q '^st, version 4\.'; then
  say "installing Python schemathesis 4 (fuzzes the API from its OpenAPI document in the tests)"
  python3 -m pip install --quiet 'schemathesis>=4,<5' || die "pip install schemathesis failed"
fi
say "toolchain ready"
