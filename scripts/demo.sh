#!/usr/bin/env bash
# The demo: builds the npm package (pkg/) and handover-server, then serves
# the Privacy Settings page and the API on the embedded SQLite demo data.
# Installs what is missing first (scripts/setup.sh). Ctrl-C stops it.
#
#   HANDOVER_BIND (default 127.0.0.1:8080), DATABASE_URL (default
#   sqlite://handover.db), HANDOVER_DEMO_RECORDS (records per demo user).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build-pkg.sh
cargo build --release -p handover-server
exec target/release/handover-server serve --demo "$@"
