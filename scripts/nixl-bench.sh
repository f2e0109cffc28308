#!/usr/bin/env bash
# NIXL's own numbers for comparison with `kvxfer bench`: runs
# scripts/nixl-bench.py (two-process DRAM-to-DRAM WRITE over NIXL's UCX
# backend) with its arguments, e.g.
#   scripts/nixl-bench.sh                       # all cases
#   UCX_TLS=tcp scripts/nixl-bench.sh --case 1x1MiB
# On first use it creates a virtual environment with the nixl-cu12 wheel (it
# runs without a GPU). KVXFER_NIXL_VENV moves the environment (default
# ~/.cache/kvxfer/nixl-venv); KVXFER_NIXL_PKG picks the wheel (default
# nixl-cu12==1.5.*).
set -euo pipefail
venv=${KVXFER_NIXL_VENV:-$HOME/.cache/kvxfer/nixl-venv}
pkg=${KVXFER_NIXL_PKG:-nixl-cu12==1.5.*}
dist=${pkg%%[=<>!~ ]*}
if ! "$venv/bin/python" -c 'import importlib.metadata as m, sys, numpy; m.version(sys.argv[1])' \
        "$dist" 2>/dev/null; then
    echo "nixl-bench: installing $pkg into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$pkg" numpy >&2
fi
exec "$venv/bin/python" "$(dirname "$0")/nixl-bench.py" "$@"
