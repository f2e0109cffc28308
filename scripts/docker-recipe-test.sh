#!/usr/bin/env bash
# Proves the Docker image's recipe on a machine without a Docker engine:
# builds libfabric from Debian 12's source package with
# docker/install_libfabric.sh into a temporary prefix, then builds kvxfer's
# libfabric crates against that prefix through LIBFABRIC_DIR, checks that their
# test binaries load the prefix's libfabric, and runs their tests.
#
# Opt-in (not part of scripts/test.sh): it needs root for apt-get and Debian's
# archive. It adds a deb-src entry for bookworm main when none is configured
# (/etc/apt/sources.list.d/kvxfer-src.list) and installs the build packages.
#
# Usage: scripts/docker-recipe-test.sh
#
# Environment:
#   KVXFER_RECIPE_SOURCE     use this libfabric source (URL, tarball or
#                            directory) instead of Debian's source package
#   KVXFER_RECIPE_VERSION    its version (required with KVXFER_RECIPE_SOURCE)
#   KVXFER_RECIPE_PROVIDERS  providers to build (default "tcp;rxm", plus verbs
#                            when the rdma-core headers are installed)
#   KVXFER_RECIPE_KEEP       1 keeps the temporary directory
#   KVXFER_RECIPE_TIMEOUT    seconds allowed for the test run (default 600)
#   CARGO_TARGET_DIR         honoured as usual
set -Eeuo pipefail

PROG=docker-recipe-test.sh
STEP=start
ROOT=$(cd "$(dirname "$0")/.." && pwd)

die() {
    echo "$PROG: error: $*" >&2
    exit 1
}
on_error() {
    local rc=$?
    echo "$PROG: step '$STEP' failed (exit status $rc)" >&2
    exit "$rc"
}
trap on_error ERR
step() {
    STEP=$1
    echo "$PROG: ==> $STEP"
}

[[ $(id -u) -eq 0 ]] || die "run as root: it installs packages and adds a deb-src entry with apt-get"
command -v cargo >/dev/null || die "cargo not found"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/kvxfer-recipe.XXXXXX")
cleanup() {
    if [[ ${KVXFER_RECIPE_KEEP:-0} == 1 ]]; then
        echo "$PROG: kept $TMP"
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
APT=(apt-get -o DPkg::Lock::Timeout=300 -o Acquire::Retries=3)

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}
install_missing() {
    local missing=() p
    for p in "$@"; do
        installed "$p" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        "${APT[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# ---------------------------------------------------------------- packages
step "build packages"
if ! install_missing build-essential autoconf automake libtool pkg-config dpkg-dev \
    curl ca-certificates bzip2 xz-utils libclang-dev clang; then
    "${APT[@]}" update -qq
    install_missing build-essential autoconf automake libtool pkg-config dpkg-dev \
        curl ca-certificates bzip2 xz-utils libclang-dev clang
fi
providers=${KVXFER_RECIPE_PROVIDERS:-}
if [[ -z $providers ]]; then
    providers="tcp;rxm"
    if install_missing libibverbs-dev librdmacm-dev; then
        providers="verbs;tcp;rxm"
    else
        echo "$PROG: rdma-core headers did not install; building without verbs"
    fi
fi

# ---------------------------------------------------------------- source
if [[ -n ${KVXFER_RECIPE_SOURCE:-} ]]; then
    [[ -n ${KVXFER_RECIPE_VERSION:-} ]] || die "KVXFER_RECIPE_SOURCE needs KVXFER_RECIPE_VERSION"
    SOURCE=$KVXFER_RECIPE_SOURCE
    VERSION=$KVXFER_RECIPE_VERSION
else
    step "deb-src entry"
    # A deb-src line for bookworm main, in one-line (.list) or deb822 (.sources) form.
    have_debsrc() {
        grep -hsE '^[[:space:]]*deb-src[[:space:]].*[[:space:]]bookworm[[:space:]].*\bmain\b' \
            /etc/apt/sources.list /etc/apt/sources.list.d/*.list && return 0
        awk 'BEGIN { RS = ""; found = 1 }
             /(^|\n)Types:[^\n]*deb-src/ && /(^|\n)Suites:[^\n]*bookworm([ \n]|$)/ &&
             /(^|\n)Components:[^\n]*main/ { found = 0 }
             END { exit found }' /etc/apt/sources.list.d/*.sources 2>/dev/null
    }
    if have_debsrc >/dev/null; then
        echo "$PROG: a deb-src entry for bookworm main exists"
    else
        # apt refuses two entries for one suite with different Signed-By, so
        # reuse the keyring of the configured deb.debian.org entry, if any.
        keyring=$(awk 'BEGIN { RS = "" }
            /(^|\n)URIs:[^\n]*deb\.debian\.org\/debian([ \n\/]|$)/ && /(^|\n)Suites:[^\n]*bookworm([ \n]|$)/ {
                if (match($0, /Signed-By: *[^\n]+/)) {
                    s = substr($0, RSTART, RLENGTH); sub(/Signed-By: */, "", s); print s; exit
                }
            }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
        opt=
        if [[ -n $keyring && $keyring == /* ]]; then
            opt="[signed-by=$keyring] "
        fi
        echo "deb-src ${opt}http://deb.debian.org/debian bookworm main" \
            >/etc/apt/sources.list.d/kvxfer-src.list
        echo "$PROG: wrote /etc/apt/sources.list.d/kvxfer-src.list: $(cat /etc/apt/sources.list.d/kvxfer-src.list)"
        "${APT[@]}" update -qq
    fi

    step "apt-get source libfabric"
    mkdir "$TMP/debian-src"
    # apt downloads as the _apt user where it can write.
    if id _apt >/dev/null 2>&1; then
        chmod 755 "$TMP"
        chown _apt "$TMP/debian-src"
    fi
    if ! (cd "$TMP/debian-src" && "${APT[@]}" source -qq libfabric); then
        die "apt-get source libfabric failed: the archive did not serve the source package;" \
            "set KVXFER_RECIPE_SOURCE and KVXFER_RECIPE_VERSION to use another libfabric source"
    fi
    dsc=$(find "$TMP/debian-src" -maxdepth 1 -name 'libfabric_*.dsc' | head -n 1)
    VERSION=$(sed -n 's/^Version: //p' "$dsc")
    SOURCE=$(find "$TMP/debian-src" -mindepth 1 -maxdepth 1 -type d -name 'libfabric-*' | head -n 1)
    [[ -n $VERSION && -d $SOURCE ]] || die "apt-get source left no libfabric source directory in $TMP/debian-src"
fi

# ---------------------------------------------------------------- libfabric
step "install_libfabric.sh $VERSION"
PREFIX="$TMP/prefix"
LIBFABRIC_LDCONFIG=no JOBS="${JOBS:-$(nproc)}" \
    "$ROOT/docker/install_libfabric.sh" "$VERSION" "$SOURCE" "$PREFIX" "$providers"

# ---------------------------------------------------------------- crates
export LIBFABRIC_DIR=$PREFIX
export LD_LIBRARY_PATH=$PREFIX/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PKG_CONFIG_PATH=$PREFIX/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
cd "$ROOT"

step "find the libfabric crates"
crates=()
metadata=$(cargo metadata --no-deps --format-version 1 --offline 2>/dev/null ||
    cargo metadata --no-deps --format-version 1)
for c in libfabric-sys kvxfer-libfabric; do
    if grep -q "\"name\":\"$c\"" <<<"$metadata"; then
        crates+=(-p "$c")
    else
        echo "$PROG: crate $c is not in the workspace; skipped"
    fi
done
((${#crates[@]})) || die "no libfabric crate in the workspace"

step "build tests against $PREFIX"
cargo test "${crates[@]}" --no-run --message-format=json >"$TMP/build.json"
mapfile -t exes < <(sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' "$TMP/build.json")
((${#exes[@]})) || die "cargo test --no-run built no test executable"

step "check which libfabric the tests load"
linked=0
for exe in "${exes[@]}"; do
    lib=$(ldd "$exe" | awk '$1 ~ /^libfabric\.so/ { print $3 }')
    [[ -z $lib ]] && continue
    [[ $lib == "$PREFIX"/* ]] || die "$exe loads libfabric from $lib, not from $PREFIX"
    echo "$PROG: ${exe##*/} -> $lib"
    linked=$((linked + 1))
done
((linked > 0)) || die "no test executable links libfabric"

step "cargo test ${crates[*]}"
timeout --kill-after=10 "${KVXFER_RECIPE_TIMEOUT:-600}" cargo test "${crates[@]}"

echo "$PROG: passed: libfabric $VERSION ($providers) from $SOURCE, ${crates[*]} tested against $PREFIX"
