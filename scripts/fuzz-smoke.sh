#!/usr/bin/env bash
# Smoke-runs every kvxfer fuzz target for a bounded time on the stable
# toolchain (RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its nightly flags).
# Seeds in fuzz/seeds/<target>/ are copied into the working corpus first.
#   FUZZ_SECONDS    seconds per target (default 20)
#   FUZZ_TARGET_DIR cargo target directory (default fuzz/target)
# Installs cargo-fuzz if it is missing.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
secs=${FUZZ_SECONDS:-20}
target_dir=${FUZZ_TARGET_DIR:-$root/fuzz/target}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz-smoke: installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz >&2
fi

cd "$root/fuzz"
mapfile -t targets < <(cargo fuzz list)
if ((${#targets[@]} == 0)); then
    echo "fuzz-smoke: no fuzz targets found" >&2
    exit 1
fi

cargo fuzz build --target-dir "$target_dir" >&2

for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    if [[ -d "seeds/$t" ]]; then
        cp -n "seeds/$t"/* "corpus/$t/" 2>/dev/null || true
    fi
    echo "fuzz-smoke: $t for ${secs}s" >&2
    # The outer timeout only guards against a hung run; libFuzzer stops
    # itself after max_total_time.
    timeout --kill-after=10 $((secs + 120)) \
        cargo fuzz run --target-dir "$target_dir" "$t" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
done
echo "fuzz-smoke: all ${#targets[@]} targets ran ${secs}s without a finding" >&2
