#!/usr/bin/env bash
# Two network namespaces joined by N veth pairs, one subnet each, every
# pair shaped to RATE with tc tbf (both directions): a stand-in for a host
# with N NICs, for measuring kvxfer over several rails.
#
#   scripts/rails-netns.sh up N [RATE]   # RATE default 1gbit
#   scripts/rails-netns.sh down N
#
# Namespaces kvxra and kvxrb; pair i (1..N): kvra<i> (10.214.<i>.1/24, in
# kvxra) and kvrb<i> (10.214.<i>.2/24, in kvxrb). Needs root.
set -euo pipefail
cmd=${1:?usage: $0 up|down N [RATE]}
n=${2:?number of rails}
rate=${3:-1gbit}
A=kvxra
B=kvxrb
case "$cmd" in
up)
    ip netns add "$A"
    ip netns add "$B"
    for ns in "$A" "$B"; do ip -n "$ns" link set lo up; done
    for i in $(seq 1 "$n"); do
        ip link add "kvra$i" type veth peer name "kvrb$i"
        ip link set "kvra$i" netns "$A"
        ip link set "kvrb$i" netns "$B"
        ip -n "$A" addr add "10.214.$i.1/24" dev "kvra$i"
        ip -n "$B" addr add "10.214.$i.2/24" dev "kvrb$i"
        for end in "$A:kvra$i" "$B:kvrb$i"; do
            ns=${end%%:*} dev=${end#*:}
            ip -n "$ns" link set "$dev" up
            tc -n "$ns" qdisc add dev "$dev" root tbf rate "$rate" burst 256kb latency 50ms
        done
    done
    ;;
down)
    ip netns del "$A" 2>/dev/null || true
    ip netns del "$B" 2>/dev/null || true
    ;;
*)
    echo "usage: $0 up|down N [RATE]" >&2
    exit 2
    ;;
esac
