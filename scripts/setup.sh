#!/usr/bin/env bash
# Installs what kvxfer needs on Debian 12 or 13.
#
#   scripts/setup.sh          to build kvxfer and run the benchmark: a C
#                             toolchain, pkg-config, libclang for bindgen, the
#                             UCX and libfabric development packages
#   scripts/setup.sh --python also the Python package: python3-venv,
#                             python3-dev and python3-pip, then a virtual
#                             environment (KVXFER_PY_VENV, default
#                             ~/.cache/kvxfer/py-venv) with maturin, numpy,
#                             pytest and kvxfer built from python/
#   scripts/setup.sh --test   also what the test command needs: the thumbv7em
#                             target (no_std build of the core), shellcheck,
#                             etcd and protoc with the well-known .proto files
#                             (feature `etcd`), iproute2 (link-cut test),
#                             procps (kill), autotools and xz-utils to
#                             build libfabric 2.x (scripts/libfabric2-check.sh),
#                             prometheus (the metrics scrape test), and the
#                             Python package as with --python
#
# As root it installs what is missing; otherwise it prints the exact command
# and fails.
set -euo pipefail

PACKAGES=(
    ca-certificates build-essential pkg-config clang libclang-dev
    libucx-dev libfabric-dev
)
python=0
if [[ ${1:-} == --test ]]; then
    PACKAGES+=(
        ucx-utils libfabric-bin
        shellcheck iproute2 procps xz-utils autoconf automake libtool
        etcd-server etcd-client protobuf-compiler libprotobuf-dev
        prometheus
    )
    python=1
elif [[ ${1:-} == --python ]]; then
    python=1
elif [[ $# -gt 0 ]]; then
    echo "usage: scripts/setup.sh [--test | --python]" >&2
    exit 2
fi
if ((python)); then
    PACKAGES+=(python3 python3-venv python3-dev python3-pip)
fi

missing=()
for p in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]]; then
        echo "kvxfer setup: installing ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "kvxfer setup: missing Debian packages. Run:" >&2
        echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
        exit 1
    fi
fi

if ! command -v cargo >/dev/null; then
    echo "kvxfer setup: cargo not found; install Rust with rustup (https://rustup.rs)" >&2
    exit 1
fi

if [[ ${1:-} == --test ]] && command -v rustup >/dev/null &&
    ! rustup target list --installed | grep -qx thumbv7em-none-eabihf; then
    rustup target add thumbv7em-none-eabihf >&2
fi

# The Python package, built from python/ into its own virtual environment.
if ((python)); then
    venv=${KVXFER_PY_VENV:-$HOME/.cache/kvxfer/py-venv}
    if [[ ! -x $venv/bin/python ]]; then
        echo "kvxfer setup: creating the Python environment $venv" >&2
        python3 -m venv "$venv"
    fi
    pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)
    if ! "$venv/bin/python" -c 'import maturin, numpy, pytest' 2>/dev/null; then
        "${pip[@]}" install maturin numpy pytest >&2
    fi
    # Built with the environment's maturin, in the workspace's target folder.
    echo "kvxfer setup: building and installing the kvxfer Python package" >&2
    PATH="$venv/bin:$PATH" "${pip[@]}" install --no-build-isolation "$(dirname "$0")/../python" >&2
fi
