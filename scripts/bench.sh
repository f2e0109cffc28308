#!/usr/bin/env bash
# The main job: a loopback transfer benchmark between two processes over the
# default backend (UCX; KVXFER_BACKEND=LIBFABRIC selects libfabric). Extra
# arguments go to `kvxfer bench` (see `kvxfer bench --help`), e.g.
#   scripts/bench.sh --block-size 16KiB --blocks 128 --stride 32KiB --op read
# Installs what it needs first (see scripts/setup.sh). BENCHMARKS.md lists
# the measurements and the commands that made them.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p kvxfer --bin kvxfer >&2
target_dir=${CARGO_TARGET_DIR:-target}
exec "$target_dir/release/kvxfer" bench "$@"
