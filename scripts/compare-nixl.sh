#!/usr/bin/env bash
# kvxfer and NIXL on the same WRITEs between two processes of this host, one
# request in flight, in one run: NIXL 1.5 through scripts/nixl-bench.sh,
# then `kvxfer bench` over UCX and libfabric (default settings; multi-block
# cases also with strided lists). Each case prints NIXL's line, then one
# JSON report per kvxfer run; the run starts with single-thread memcpy
# bandwidth at 1 MiB and 16 MiB for reference.
#   SECONDS_PER_CASE  length of each run (default 3)
#   CASES             "BLOCK BLOCKS STRIDE;..." (default: 4 KiB, 1 MiB,
#                     16 MiB, 128 x 16 KiB, 2,048 x 16 KiB, 16,384 x 4 KiB)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${SECONDS_PER_CASE:-3}
cases=${CASES:-"4KiB 1 4KiB;1MiB 1 1MiB;16MiB 1 16MiB;16KiB 128 32KiB;16KiB 2048 32KiB;4KiB 16384 8KiB"}
cargo build --release --quiet -p kvxfer
kv=target/release/kvxfer
# Creates NIXL's environment on first use; its Python has numpy.
scripts/nixl-bench.sh --help >/dev/null
py=${KVXFER_NIXL_VENV:-$HOME/.cache/kvxfer/nixl-venv}/bin/python
"$py" - <<'EOF'
import time
import numpy as np
for size in (1 << 20, 16 << 20):
    src = np.full(size, 7, np.uint8)
    dst = np.empty_like(src)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < 1.0:
        np.copyto(dst, src)
        n += 1
    print(f"memcpy {size >> 20} MiB: {size * n / (time.perf_counter() - t) / 1e9:.2f} GB/s")
EOF
IFS=';' read -r -a list <<<"$cases"
for c in "${list[@]}"; do
    read -r block blocks stride <<<"$c"
    echo "== $blocks x $block at a $stride stride"
    scripts/nixl-bench.sh --seconds "$secs" --blocks "$blocks" --block-size "$block" \
        --stride "$stride" | grep '^nixl case'
    modes=("")
    if ((blocks > 1)); then
        modes+=(--strided)
    fi
    for backend in UCX LIBFABRIC; do
        for lists in "${modes[@]}"; do
            # shellcheck disable=SC2086 # $lists is empty or one flag
            KVXFER_BACKEND=$backend "$kv" bench --block-size "$block" --blocks "$blocks" \
                --stride "$stride" --inflight 1 --duration "${secs}s" --json $lists
        done
    done
done
