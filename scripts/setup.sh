#!/usr/bin/env bash
# Installs what kvxfer needs on Debian 12 or 13.
#
#   scripts/setup.sh          to build kvxfer and run the benchmark: a C
#                             toolchain, pkg-config, libclang for bindgen, the
#                             UCX and libfabric development packages
#   scripts/setup.sh --test   also what the test command needs: the thumbv7em
#                             target (no_std build of the core), shellcheck,
#                             etcd and protoc with the well-known .proto files
#                             (feature `etcd`), iproute2 (link-cut test),
#                             procps (kill), and autotools and xz-utils to
#                             build libfabric 2.x (scripts/libfabric2-check.sh)
#
# As root it installs what is missing; otherwise it prints the exact command
# and fails.
set -euo pipefail

PACKAGES=(
    ca-certificates build-essential pkg-config clang libclang-dev
    libucx-dev libfabric-dev
)
if [[ ${1:-} == --test ]]; then
    PACKAGES+=(
        ucx-utils libfabric-bin
        shellcheck iproute2 procps xz-utils autoconf automake libtool
        etcd-server etcd-client protobuf-compiler libprotobuf-dev
    )
elif [[ $# -gt 0 ]]; then
    echo "usage: scripts/setup.sh [--test]" >&2
    exit 2
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
