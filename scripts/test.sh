#!/usr/bin/env bash
# Runs every check kvxfer has: formatting, lints, the no_std build of the
# core, shell script lints, the whole test suite (multi-process transfers over
# real UCX and libfabric on loopback), and a short run of each fuzz target.
# Installs what it needs first (see scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

step "set-up"
scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

step "kvxfer-core builds for thumbv7em-none-eabihf (no_std, no alloc, 32-bit)"
cargo build -p kvxfer-core --target thumbv7em-none-eabihf

step "shellcheck"
shellcheck scripts/*.sh docker/*.sh .ci/run

step "cargo test"
cargo test --workspace --no-fail-fast

if [[ -x scripts/fuzz-smoke.sh && "${KVXFER_SKIP_FUZZ:-0}" != 1 ]]; then
    step "fuzz smoke run"
    scripts/fuzz-smoke.sh
fi
