#!/usr/bin/env bash
# kvxfer and NIXL on the same KV-cache-sized WRITEs between two processes of
# this host, one request in flight, in one run: NIXL 1.5 through
# scripts/nixl-bench.sh, then `kvxfer bench` over UCX and libfabric with
# explicit and strided lists. Each case prints NIXL's line, then one JSON
# report per kvxfer run. SECONDS_PER_CASE (default 3) sets each run's length.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${SECONDS_PER_CASE:-3}
cargo build --release --quiet -p kvxfer
kv=target/release/kvxfer
for c in "4KiB 16384 8KiB" "16KiB 2048 32KiB" "16KiB 128 32KiB"; do
    read -r block blocks stride <<<"$c"
    echo "== $blocks x $block at a $stride stride"
    scripts/nixl-bench.sh --seconds "$secs" --blocks "$blocks" --block-size "$block" \
        --stride "$stride" | grep '^nixl case'
    for backend in UCX LIBFABRIC; do
        for lists in "" --strided; do
            KVXFER_BACKEND=$backend "$kv" bench --block-size "$block" --blocks "$blocks" \
                --stride "$stride" --inflight 1 --duration "${secs}s" --json $lists
        done
    done
done
