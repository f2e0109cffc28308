#!/usr/bin/env bash
# Builds and tests kvxfer's libfabric crates against libfabric 2.x, beside
# the system's 1.x that the rest of the test command uses.
#
# libfabric 2.x comes from Debian 13's source package (the upstream
# tarball, checked against the signed index): it is built once with the
# tcp, rxm, shm and sockets providers into a cache folder and reused. The
# crates are then linted (clippy, warnings are errors) and tested with
# LIBFABRIC_DIR pointing at it, in a target folder of their own.
#
#   LIBFABRIC2_PREFIX   an installed libfabric 2.x to use instead (nothing
#                       is downloaded or built)
#   LIBFABRIC2_CACHE    cache folder (default ~/.cache/kvxfer)
#   LIBFABRIC2_SUITE    Debian suite whose source is taken (default trixie)
#   CARGO_TARGET_DIR    honoured; the crates build under its libfabric2/
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

say() { echo "libfabric2-check: $*" >&2; }
die() {
    say "error: $*"
    exit 1
}

# The Debian mirror this machine's apt uses.
mirror() {
    local m
    m=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null |
        awk '{ print $1 }' | grep -v security | head -n 1)
    if [[ -z $m ]]; then
        m=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' \
            /etc/apt/sources.list 2>/dev/null | grep -v security | head -n 1)
    fi
    [[ -n $m ]] || die "no Debian mirror found in /etc/apt/sources.list{,.d}"
    echo "${m%/}"
}

# Downloads the upstream tarball of the suite's libfabric source package
# into $1 and prints "VERSION PATH".
fetch_source() {
    local dir=$1 apt_dir=$1/apt suite=${LIBFABRIC2_SUITE:-trixie}
    mkdir -p "$apt_dir"/{lists/partial,cache/archives/partial,etc}
    echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $(mirror) $suite main" \
        >"$apt_dir/etc/sources.list"
    local opts=(
        -o "Dir::Etc::SourceList=$apt_dir/etc/sources.list"
        -o "Dir::Etc::SourceParts=$apt_dir/etc/none"
        -o "Dir::State::Lists=$apt_dir/lists"
        -o "Dir::Cache=$apt_dir/cache"
        -o "Debug::NoLocking=1"
        -o "APT::Sandbox::User=root"
    )
    apt-get "${opts[@]}" -qq update >&2 || die "apt-get update of $suite's source index failed"
    local record
    record=$(apt-cache "${opts[@]}" showsrc libfabric 2>/dev/null |
        awk 'BEGIN { RS = "" } /(^|\n)Package: libfabric\n/ { print; exit }')
    [[ -n $record ]] || die "$suite has no libfabric source package"
    local directory version name sha
    directory=$(sed -n 's/^Directory: //p' <<<"$record")
    version=$(sed -n 's/^Version: //p' <<<"$record")
    read -r sha name < <(awk '/^Checksums-Sha256:/ { on = 1; next } /^[^ ]/ { on = 0 }
        on && $3 ~ /\.orig\.tar\./ { print $1, $3; exit }' <<<"$record")
    [[ -n $directory && -n $version && -n $name && -n $sha ]] ||
        die "cannot read the libfabric source record of $suite"
    [[ $version == 2.* ]] || die "$suite's libfabric is $version, not 2.x"
    say "downloading $name ($suite, sha256 $sha)"
    /usr/lib/apt/apt-helper download-file "$(mirror)/$directory/$name" "$dir/$name" "SHA256:$sha" \
        >"$dir/download.log" 2>&1 || {
        cat "$dir/download.log" >&2
        die "download of $name failed"
    }
    echo "${version%%-*} $dir/$name"
}

if [[ -n ${LIBFABRIC2_PREFIX:-} ]]; then
    prefix=$LIBFABRIC2_PREFIX
    [[ -f $prefix/include/rdma/fabric.h ]] || die "LIBFABRIC2_PREFIX=$prefix has no include/rdma/fabric.h"
else
    cache=${LIBFABRIC2_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvxfer}
    prefix=$cache/libfabric2
    if [[ -f $prefix/.complete ]]; then
        say "using $(cat "$prefix/.complete") in $prefix"
    else
        work=$(mktemp -d "${TMPDIR:-/tmp}/kvxfer-libfabric2.XXXXXX")
        trap 'rm -rf "$work"' EXIT
        read -r version tarball < <(fetch_source "$work")
        [[ -n ${tarball:-} ]] || die "no libfabric source downloaded"
        rm -rf "$prefix"
        say "building libfabric $version (tcp, rxm, shm, sockets) into $prefix"
        LIBFABRIC_LDCONFIG=no JOBS="$(nproc)" \
            docker/install_libfabric.sh "$version" "$tarball" "$prefix" "tcp;rxm;shm;sockets" \
            >"$work/build.log" 2>&1 || {
            tail -n 40 "$work/build.log" >&2
            die "building libfabric $version failed (last lines above)"
        }
        echo "libfabric $version" >"$prefix/.complete"
    fi
fi

major=$(sed -n -E 's/^#define FI_MAJOR_VERSION ([0-9]+).*/\1/p' "$prefix/include/rdma/fabric.h")
((major >= 2)) || die "$prefix holds libfabric $major.x, not 2.x"

export LIBFABRIC_DIR=$prefix
export LD_LIBRARY_PATH=$prefix/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}/libfabric2
say "clippy and tests of libfabric-sys and kvxfer-libfabric against $prefix"
cargo clippy -p libfabric-sys -p kvxfer-libfabric --all-targets -- -D warnings
cargo test -p libfabric-sys -p kvxfer-libfabric
