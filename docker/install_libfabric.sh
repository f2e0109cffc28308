#!/usr/bin/env bash
# Builds libfabric from source with a chosen set of providers, installs it into
# a prefix, makes it findable, and checks the result.
#
# Usage: install_libfabric.sh VERSION SOURCE [PREFIX] [PROVIDERS]
#
#   VERSION    the libfabric version the source holds, e.g. 1.21.0 (a Debian
#              version such as 1.17.0-3 is accepted: its revision is ignored)
#   SOURCE     an http(s) URL of a release tarball (downloaded with curl), a
#              tarball on disk, or an unpacked source directory (copied first,
#              so the original stays untouched)
#   PREFIX     install prefix (default /opt/libfabric)
#   PROVIDERS  providers to build, separated by ';', ',' or spaces
#              (default "verbs;tcp;rxm"); every other provider is disabled
#
# Environment:
#   LIBFABRIC_SHA256          expected SHA-256 of the tarball (checked when set)
#   LIBFABRIC_CONFIGURE_ARGS  extra arguments for configure (split on spaces)
#   LIBFABRIC_LDCONFIG        auto (default: write ld config when root), yes, no
#   LIBFABRIC_KEEP_BUILD      1 keeps the build directory
#   JOBS                      parallel make jobs (default: nproc)
#
# Exits non-zero, naming the step, when any step fails, when the installed
# version differs from VERSION, or when a requested provider is not listed by
# `fi_info -l`. The one exception: verbs (and efa) need an RDMA device to be
# listed; on a machine without one (a container build host) they are accepted
# when the build configured them in, and the script says so.
set -Eeuo pipefail

PROG=install_libfabric.sh
STEP="argument check"

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

usage() {
    sed -n '2,/^set -Eeuo/p' "$0" | sed -e '/^set -Eeuo/d' -e 's/^# \{0,1\}//' >&2
    exit 2
}

[[ $# -ge 2 && $# -le 4 ]] || usage

VERSION=$1
SOURCE=$2
PREFIX=${3:-/opt/libfabric}
PROVIDERS_ARG=${4:-verbs;tcp;rxm}

[[ $VERSION =~ ^([0-9]+:)?[0-9]+\.[0-9]+(\.[0-9]+)?[A-Za-z0-9.+~-]*$ ]] ||
    die "VERSION '$VERSION' is not a version like 1.21.0"
[[ -n $SOURCE ]] || die "SOURCE is empty"
[[ $PREFIX == /* ]] || die "PREFIX '$PREFIX' must be an absolute path"

# Upstream version: drop a Debian epoch ("1:"), revision ("-3") and
# repack suffixes ("+dfsg", "~rc") so 1.17.0-3 compares as 1.17.0.
upstream_version() {
    local v=${1#*:}
    v=${v%%-*}
    v=${v%%+*}
    v=${v%%~*}
    printf '%s\n' "$v"
}
WANT_VERSION=$(upstream_version "$VERSION")

# Requested providers, as configure knows them (rxm, not ofi_rxm).
read -r -a PROVIDERS <<<"${PROVIDERS_ARG//[;,]/ }"
[[ ${#PROVIDERS[@]} -gt 0 ]] || die "PROVIDERS '$PROVIDERS_ARG' names no provider"
for i in "${!PROVIDERS[@]}"; do
    p=${PROVIDERS[$i]#ofi_}
    [[ $p =~ ^[a-z0-9_]+$ ]] || die "provider '${PROVIDERS[$i]}' is not a provider name"
    PROVIDERS[i]=$p
done

# contains WORD LIST...: whether WORD is one of LIST.
contains() {
    local w=$1 x
    shift
    for x in "$@"; do
        [[ $x == "$w" ]] && return 0
    done
    return 1
}

for tool in make cc tar; do
    command -v "$tool" >/dev/null || die "'$tool' is not installed (needed to build libfabric)"
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/libfabric-build.XXXXXX")
cleanup() {
    if [[ ${LIBFABRIC_KEEP_BUILD:-0} == 1 ]]; then
        echo "$PROG: build directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

# ---------------------------------------------------------------- source
step "fetch source"
if [[ $SOURCE =~ ^(https?|ftp):// ]]; then
    command -v curl >/dev/null || die "'curl' is not installed (needed to download $SOURCE)"
    TARBALL="$WORK/${SOURCE##*/}"
    curl -fSL --retry 3 --connect-timeout 30 -o "$TARBALL" "$SOURCE" ||
        die "download of '$SOURCE' failed"
elif [[ -d $SOURCE ]]; then
    TARBALL=
elif [[ -f $SOURCE ]]; then
    TARBALL=$SOURCE
else
    die "SOURCE '$SOURCE' is neither a URL, a tarball nor a directory"
fi

if [[ -n $TARBALL && -n ${LIBFABRIC_SHA256:-} ]]; then
    step "verify checksum"
    have=$(sha256sum "$TARBALL" | cut -d' ' -f1)
    [[ $have == "$LIBFABRIC_SHA256" ]] ||
        die "SHA-256 of '$TARBALL' is $have, expected $LIBFABRIC_SHA256"
fi

step "unpack source"
mkdir "$WORK/src"
if [[ -n $TARBALL ]]; then
    tar -xf "$TARBALL" -C "$WORK/src" || die "'$TARBALL' is not a readable tarball"
    mapfile -t tops < <(find "$WORK/src" -mindepth 1 -maxdepth 1)
    if [[ ${#tops[@]} -eq 1 && -d ${tops[0]} ]]; then
        SRC=${tops[0]}
    else
        SRC="$WORK/src"
    fi
else
    cp -a "$SOURCE/." "$WORK/src/"
    SRC="$WORK/src"
fi
[[ -f $SRC/configure || -f $SRC/configure.ac ]] ||
    die "'$SOURCE' holds no libfabric source (no configure nor configure.ac)"
[[ -f $SRC/include/rdma/fabric.h ]] ||
    die "'$SOURCE' holds no libfabric source (no include/rdma/fabric.h)"
cd "$SRC"

if [[ ! -x configure ]]; then
    step "autogen"
    for tool in autoreconf libtoolize automake; do
        command -v "$tool" >/dev/null ||
            die "'$tool' is not installed (the source has no configure script)"
    done
    if [[ -x autogen.sh ]]; then
        ./autogen.sh
    else
        autoreconf -fi
    fi
fi

step "check source version"
src_version=$(sed -n -E "s/^PACKAGE_VERSION='(.*)'$/\1/p" configure)
[[ -n $src_version ]] || die "configure declares no PACKAGE_VERSION"
[[ $(upstream_version "$src_version") == "$WANT_VERSION" ]] ||
    die "'$SOURCE' holds libfabric $src_version, expected $WANT_VERSION (from VERSION '$VERSION')"

# ---------------------------------------------------------------- configure
step "list providers"
# configure --help offers every provider as "--enable-NAME[=yes|no|auto|dl|PATH]"
# (2.x adds "|dl:PATH").
mapfile -t KNOWN < <(./configure --help |
    sed -n -E 's/^ +--enable-([a-z0-9_]+)\[=yes\|no\|auto\|dl\|PATH(\|dl:PATH)?\].*/\1/p' | sort -u)
[[ ${#KNOWN[@]} -gt 0 ]] || die "configure --help lists no provider"
for p in "${PROVIDERS[@]}"; do
    contains "$p" "${KNOWN[@]}" ||
        die "provider '$p' is not known to this libfabric source (known: ${KNOWN[*]})"
done

CONFIGURE_ARGS=(--prefix="$PREFIX" --disable-static)
for k in "${KNOWN[@]}"; do
    if contains "$k" "${PROVIDERS[@]}"; then
        CONFIGURE_ARGS+=("--enable-$k=yes")
    else
        CONFIGURE_ARGS+=("--enable-$k=no")
    fi
done
if [[ -n ${LIBFABRIC_CONFIGURE_ARGS:-} ]]; then
    read -r -a extra <<<"$LIBFABRIC_CONFIGURE_ARGS"
    CONFIGURE_ARGS+=("${extra[@]}")
fi

step "configure"
echo "$PROG: ./configure ${CONFIGURE_ARGS[*]}"
./configure "${CONFIGURE_ARGS[@]}" >"$WORK/configure.log" 2>&1 || {
    tail -n 40 "$WORK/configure.log" >&2
    die "configure failed (log above; providers requested: ${PROVIDERS[*]})"
}
sed -n '/^\*\*\*/p' "$WORK/configure.log"

# config.h records each provider as HAVE_<NAME> 1 (built in) or HAVE_<NAME>_DL 1.
built_in() {
    local up=${1^^}
    grep -Eq "^#define HAVE_${up}(_DL)? 1$" config.h
}
for p in "${PROVIDERS[@]}"; do
    built_in "$p" || die "configure did not enable provider '$p'"
done

step "make"
make -j"${JOBS:-$(nproc)}" >"$WORK/make.log" 2>&1 || {
    tail -n 40 "$WORK/make.log" >&2
    die "make failed (log above)"
}

step "make install"
make install >"$WORK/install.log" 2>&1 || {
    tail -n 40 "$WORK/install.log" >&2
    die "make install into '$PREFIX' failed (log above)"
}

LIBDIR=
for d in "$PREFIX/lib" "$PREFIX/lib64"; do
    if [[ -e $d/libfabric.so ]]; then
        LIBDIR=$d
        break
    fi
done
[[ -n $LIBDIR ]] || die "no libfabric.so under '$PREFIX/lib' or '$PREFIX/lib64' after install"

# ---------------------------------------------------------------- ld config
step "ld config"
mode=${LIBFABRIC_LDCONFIG:-auto}
case $mode in
auto)
    if [[ $(id -u) -eq 0 ]]; then mode=yes; else mode=no; fi
    ;;
yes | no) ;;
*) die "LIBFABRIC_LDCONFIG '$mode' is not auto, yes or no" ;;
esac
if [[ $mode == yes ]]; then
    echo "$LIBDIR" >/etc/ld.so.conf.d/libfabric.conf
    ldconfig
    echo "$PROG: wrote /etc/ld.so.conf.d/libfabric.conf ($LIBDIR) and ran ldconfig"
else
    echo "$PROG: to make libfabric findable, run as root:"
    echo "    echo $LIBDIR > /etc/ld.so.conf.d/libfabric.conf && ldconfig"
    echo "$PROG: or set, for builds and runs:"
    echo "    export LIBFABRIC_DIR=$PREFIX PKG_CONFIG_PATH=$LIBDIR/pkgconfig LD_LIBRARY_PATH=$LIBDIR"
fi

# ---------------------------------------------------------------- checks
step "check version"
FI_INFO="$PREFIX/bin/fi_info"
[[ -x $FI_INFO ]] || die "'$FI_INFO' was not installed"
loaded=$(LD_LIBRARY_PATH=$LIBDIR ldd "$FI_INFO" | awk '$1 ~ /^libfabric\.so/ {print $3}')
[[ $loaded == "$LIBDIR"/* ]] ||
    die "'$FI_INFO' loads libfabric from '${loaded:-nowhere}', not from '$LIBDIR'"
have=$(LD_LIBRARY_PATH=$LIBDIR "$FI_INFO" --version | sed -n -E 's/^libfabric: *//p')
[[ -n $have ]] || die "'$FI_INFO --version' printed no 'libfabric:' line"
if [[ $have != "$WANT_VERSION" && $(upstream_version "$have") != "$WANT_VERSION" ]]; then
    die "installed libfabric is version '$have', expected '$WANT_VERSION' (from VERSION '$VERSION')"
fi
echo "$PROG: libfabric $have in $PREFIX"

step "check providers"
LISTED=$(LD_LIBRARY_PATH=$LIBDIR "$FI_INFO" -l | sed -n -E 's/^([A-Za-z0-9_;-]+):$/\1/p')
echo "$PROG: fi_info -l lists: $(echo "$LISTED" | tr '\n' ' ')"
have_rdma_device() {
    compgen -G '/sys/class/infiniband/*' >/dev/null
}
missing=()
for p in "${PROVIDERS[@]}"; do
    if grep -Eqx "(ofi[_-])?$p" <<<"$LISTED"; then
        continue
    fi
    if [[ $p == verbs || $p == efa ]] && ! have_rdma_device; then
        echo "$PROG: note: provider '$p' is built in but not listed by fi_info -l because" \
            "this machine has no RDMA device (/sys/class/infiniband is empty);" \
            "it is listed on a host with one"
        continue
    fi
    missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] ||
    die "requested providers not listed by '$FI_INFO -l': ${missing[*]}"

echo "$PROG: done: libfabric $have with providers ${PROVIDERS[*]} in $PREFIX"
