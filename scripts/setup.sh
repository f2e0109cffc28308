#!/usr/bin/env bash
# Installs what kvxfer needs to build and test on Debian 12: the UCX and
# libfabric development packages and tools, libclang for bindgen, shellcheck,
# etcd and protoc for the etcd tests, iproute2 for the link-cut test, and the
# thumbv7em target that proves the core is no_std.
# As root it installs; otherwise it prints the exact command and fails.
set -euo pipefail

PACKAGES=(
    build-essential pkg-config clang libclang-dev
    libucx-dev ucx-utils
    libfabric-dev libfabric-bin
    shellcheck iproute2 procps
    etcd-server etcd-client protobuf-compiler
)

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

if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx thumbv7em-none-eabihf; then
    rustup target add thumbv7em-none-eabihf >&2
fi
