#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo fuzz, libFuzzer) of what reads untrusted
# input: the decryptor, the record-page decoder, exportData's options.
#
#   scripts/fuzz.sh [SECONDS per target, default 60]
#
# Needs the nightly toolchain; installs it and cargo-fuzz when missing.
# Not part of scripts/test.sh (CI time): the property tests there cover the
# same entry points with generated input on every run.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for target in decrypt decrypt_any decode_frame parse_options; do
  echo "== fuzz $target for ${secs}s"
  mkdir -p "fuzz/corpus/$target"
  cargo +nightly fuzz run "$target" "fuzz/corpus/$target" -- -max_total_time="$secs" -max_len=70000 2>&1 \
    | grep -E "^(#[0-9]+.*DONE|Done|==[0-9]+==|SUMMARY|artifact_prefix|Test unit written)" || true
  # A crash leaves fuzz/artifacts/<target>/crash-* and a non-zero status.
  if ls "fuzz/artifacts/$target"/crash-* >/dev/null 2>&1; then
    echo "fuzz: $target crashed: see fuzz/artifacts/$target" >&2
    exit 1
  fi
done
echo "fuzz: no crashes"
