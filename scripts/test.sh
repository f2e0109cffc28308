#!/usr/bin/env bash
# Runs every check kvxfer has: formatting, lints, the no_std build of the
# core, shell script lints, the whole test suite (multi-process transfers over
# real UCX and libfabric on loopback), the libfabric crates against
# libfabric 2.x, the Python package's tests (pytest, over UCX and over
# libfabric), and a short run of each fuzz target.
# Installs what it needs first (scripts/setup.sh --test, which also builds
# and installs the Python package into ~/.cache/kvxfer/py-venv).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

step "set-up"
scripts/setup.sh --test

# A clean build of the test binaries and fuzz targets takes about 2 GiB; a full
# disk shows up later as a linker "Bus error" or "No space left on device".
build_dir=${CARGO_TARGET_DIR:-.}
mkdir -p "$build_dir"
free_mib=$(df -Pm "$build_dir" | awk 'NR == 2 { print $4 }')
if ((free_mib < 3072)); then
    echo "warning: only ${free_mib} MiB free for the build in ${build_dir};" \
        "a clean build of the tests needs about 2 GiB" >&2
fi

step "cargo fmt --check"
cargo fmt --all -- --check

# CUDA support is in the default features (the driver is loaded at run
# time), so this also lints the GPU code.
step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

step "kvxfer-core builds for thumbv7em-none-eabihf (no_std, no alloc, 32-bit)"
cargo build -p kvxfer-core --target thumbv7em-none-eabihf

step "shellcheck"
shellcheck scripts/*.sh docker/*.sh .ci/run

step "cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# The link-cut tests run their processes in network namespaces with
# `ip netns exec`, which needs root and a root directory that is a mount
# point (it is not in a chroot). Where that cannot work they are left out,
# said here, and counted as skipped.
netns_works() {
    local ns="kvxfer-probe-$$" rc=0
    ip netns add "$ns" 2>/dev/null || return 1
    ip netns exec "$ns" true 2>/dev/null || rc=1
    ip netns del "$ns" 2>/dev/null || true
    return "$rc"
}
filter=()
if ! netns_works; then
    echo "note: 'ip netns exec' does not work here (not root, or a chroot);" \
        "the link-cut tests are left out and counted as skipped" >&2
    filter=(-- --skip link_cut)
fi
# With the default features this includes the GPU tests that need no GPU
# (std-shim/tests/gpu.rs: clear errors without a CUDA driver).
cargo test --workspace --no-fail-fast "${filter[@]}" 2>&1 | tee "$log" || status=$?

step "examples: cargo run --example write_notify, prepared_lists, etcd_discovery"
for example in write_notify prepared_lists; do
    cargo run -q -p kvxfer --example "$example" 2>&1 | tee -a "$log" || status=$?
done
# etcd_discovery needs an etcd: one of its own on loopback, in a scratch dir.
etcd_dir=$(mktemp -d)
etcd --data-dir "$etcd_dir" --listen-client-urls http://127.0.0.1:23479 \
    --advertise-client-urls http://127.0.0.1:23479 \
    --listen-peer-urls http://127.0.0.1:23480 >"$etcd_dir.log" 2>&1 &
etcd_pid=$!
for _ in $(seq 100); do
    (: >/dev/tcp/127.0.0.1/23479) 2>/dev/null && break
    sleep 0.1
done
KVXFER_EXAMPLE_ETCD=http://127.0.0.1:23479 \
    cargo run -q -p kvxfer --features etcd --example etcd_discovery 2>&1 | tee -a "$log" ||
    status=$?
kill "$etcd_pid"
wait "$etcd_pid" 2>/dev/null || true
rm -rf "$etcd_dir" "$etcd_dir.log"

step "cargo doc -p kvxfer (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc -q -p kvxfer --no-deps || status=$?

step "libfabric 2.x: build, clippy and tests of the libfabric crates"
scripts/libfabric2-check.sh 2>&1 | tee -a "$log" || status=$?
# One closing line for the whole suite (cargo prints one per test binary,
# pytest one per run).
read -r passed failed ignored < <(awk '/^test result:/ {
        for (i = 1; i <= NF; i++) {
            if ($(i) ~ /^passed;?$/) p += $(i - 1)
            if ($(i) ~ /^failed;?$/) f += $(i - 1)
            if ($(i) ~ /^ignored;?$/) g += $(i - 1)
            if ($(i) ~ /^out;?$/ && $(i - 1) == "filtered") g += $(i - 2)
        }
    } END { print p + 0, f + 0, g + 0 }' "$log")

# The Python package (installed from python/ by the set-up), over each
# backend; its counts join the closing line.
step "pytest: the Python package (kvxfer, kvxfer.nixl)"
venv=${KVXFER_PY_VENV:-$HOME/.cache/kvxfer/py-venv}
for backend in UCX LIBFABRIC; do
    echo "-- KVXFER_BACKEND=$backend" >&2
    KVXFER_BACKEND=$backend "$venv/bin/python" -m pytest -q -rs -p no:cacheprovider \
        python/tests 2>&1 | tee "$log.py" || status=$?
    read -r p f s < <(awk '/ in [0-9.]+s/ {
            for (i = 1; i <= NF; i++) {
                if ($(i) ~ /^passed/) p += $(i - 1)
                if ($(i) ~ /^(failed|errors?)/) f += $(i - 1)
                if ($(i) ~ /^skipped/) s += $(i - 1)
            }
        } END { print p + 0, f + 0, s + 0 }' "$log.py")
    rm -f "$log.py"
    passed=$((passed + p)) failed=$((failed + f)) ignored=$((ignored + s))
done

if ((status != 0)); then
    echo "tests: ${passed} passed, ${failed} failed, ${ignored} skipped"
    exit "$status"
fi

if [[ -x scripts/fuzz-smoke.sh && "${KVXFER_SKIP_FUZZ:-0}" != 1 ]]; then
    step "fuzz smoke run"
    scripts/fuzz-smoke.sh
fi

echo "tests: ${passed} passed, ${failed} failed, ${ignored} skipped"
