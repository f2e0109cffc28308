#!/usr/bin/env bash
# NIXL's Python API on NIXL and on kvxfer, side by side, in one run: the same
# program (scripts/nixl-bench.py: two processes, prep_xfer_dlist +
# make_prepped_xfer, one request in flight, re-posted from Python) once with
# NIXL's import and once with kvxfer.nixl's, case by case, ROUNDS times
# (default 1), then one table. kvxfer's runs also measure what its Python
# layer adds per transfer + check_xfer_state over the Rust calls (--overhead).
#
#   scripts/python-bench.sh                # all five cases
#   ROUNDS=3 SECONDS_PER_CASE=2 scripts/python-bench.sh
#
# kvxfer runs in the environment scripts/setup.sh --python creates
# (KVXFER_PY_VENV, default ~/.cache/kvxfer/py-venv); NIXL in the one
# scripts/nixl-bench.sh creates (nixl-cu12 from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-1}
secs=${SECONDS_PER_CASE:-2}
py_venv=${KVXFER_PY_VENV:-$HOME/.cache/kvxfer/py-venv}
nixl_venv=${KVXFER_NIXL_VENV:-$HOME/.cache/kvxfer/nixl-venv}
if ! "$py_venv/bin/python" -c 'import kvxfer.nixl' 2>/dev/null; then
    echo "python-bench: kvxfer is not installed in $py_venv; run scripts/setup.sh --python" >&2
    exit 1
fi
# Creates NIXL's environment on first use.
scripts/nixl-bench.sh --help >/dev/null
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cases=(1x4KiB 1x1MiB 1x16MiB 128x16KiB@32KiB 16384x4KiB@8KiB)
for ((r = 1; r <= rounds; r++)); do
    for c in "${cases[@]}"; do
        "$nixl_venv/bin/python" scripts/nixl-bench.py --case "$c" --seconds "$secs" | tee -a "$log"
        extra=()
        [[ $c == 1x4KiB ]] && extra=(--overhead)
        "$py_venv/bin/python" scripts/nixl-bench.py --api kvxfer --case "$c" --seconds "$secs" \
            "${extra[@]}" | tee -a "$log"
    done
done
"$py_venv/bin/python" - "$log" <<'EOF'
import re
import sys
from collections import defaultdict

runs = defaultdict(list)  # (api, case) -> [(GBps, p50)]
overhead = []
for line in open(sys.argv[1]):
    kv = dict(re.findall(r"(\w+)=(\S+)", line))
    api = line.split()[0]
    if " overhead " in line:
        overhead.append(kv)
    elif "case" in kv and "GBps" in kv:
        runs[(api, kv["case"])].append((float(kv["GBps"]), float(kv["p50_us"])))
cases = []
for _, c in runs:
    if c not in cases:
        cases.append(c)
print()
print("| case | NIXL GB/s | kvxfer GB/s | × NIXL | NIXL p50 µs | kvxfer p50 µs |")
print("|---|---|---|---|---|---|")
for c in cases:
    n, k = runs[("nixl", c)], runs[("kvxfer", c)]
    ratios = [kb / nb for (nb, _), (kb, _) in zip(n, k) if nb > 0]
    print(f"| {c} | {' / '.join(f'{g:.2f}' for g, _ in n)} "
          f"| {' / '.join(f'{g:.2f}' for g, _ in k)} "
          f"| {' / '.join(f'{x:.1f}' for x in ratios)} "
          f"| {' / '.join(f'{p:.1f}' for _, p in n)} "
          f"| {' / '.join(f'{p:.1f}' for _, p in k)} |")
for o in overhead:
    print(f"\nkvxfer Python layer, {o['case']}: +{o['per_post_us']} µs per transfer() round "
          f"({o['polls_per_post_p50']} check_xfer_state calls at p50; Python "
          f"{o['python_p50_us']} µs vs Rust {o['rust_p50_us']} µs), "
          f"+{o['check_added_us']} µs per check_xfer_state ({o['check_python_us']} vs "
          f"{o['check_rust_us']} µs)")
EOF
