#!/usr/bin/env bash
# The main job: a loopback transfer benchmark between two processes over the
# default backend (UCX; KVXFER_BACKEND=LIBFABRIC selects libfabric). Extra
# arguments go to `kvxfer bench` (see `kvxfer bench --help`).
# Installs what it needs first (see scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p kvxfer --bin kvxfer >&2
exec target/release/kvxfer bench "$@"
