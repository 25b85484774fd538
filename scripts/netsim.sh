#!/usr/bin/env bash
# A network to benchmark against: N network namespaces (baton-ns0 .. baton-ns{N-1}), each with
# one veth into a bridge (baton-br, 10.77.0.254/24 in this namespace) at 10.77.0.{1..N}; every
# veth end is shaped with tc (a token bucket at RATE, both directions, so a hop between two
# nodes crosses two shaped queues at RATE) and, where the kernel has netem, DELAY each way.
#   scripts/netsim.sh up N PROFILE      PROFILE: rack (25 Gb/s, 10 us), wan (1 Gb/s, 1 ms),
#                                       or RATE,DELAY as tc writes them (e.g. 10gbit,100us)
#   scripts/netsim.sh down              removes every namespace, veth and the bridge
#   scripts/netsim.sh exec I CMD...     runs CMD in namespace I
# Delay needs the kernel's netem qdisc; without it `up` says so and fails unless
# NETSIM_ALLOW_NO_DELAY=1, when it shapes bandwidth only and prints that it did.
# Needs root (ip netns, tc). Remove what it made with `down`.
set -euo pipefail
cmd=${1:?usage: netsim.sh up N PROFILE | down | exec I CMD...}
bridge=baton-br

profile() { # -> "RATE DELAY"
    case $1 in
        rack) echo "25gbit 10us" ;;
        wan) echo "1gbit 1ms" ;;
        *,*) echo "${1%,*} ${1#*,}" ;;
        *) echo "netsim: unknown profile \"$1\" (rack, wan, or RATE,DELAY)" >&2; exit 2 ;;
    esac
}

have_netem() {
    ip link add baton-probe type dummy 2>/dev/null || return 1
    local ok=1
    tc qdisc add dev baton-probe root netem delay 1ms 2>/dev/null && ok=0
    ip link del baton-probe 2>/dev/null || true
    return $ok
}

# shape DEV RATE DELAY [NS]: a token bucket at RATE, under netem's DELAY when there is netem.
shape() {
    local dev=$1 rate=$2 delay=$3 ns=${4:-}
    local tc=(tc) burst
    [ -n "$ns" ] && tc=(ip netns exec "$ns" tc)
    # A burst of at least one rate-millisecond (and 64 KiB), so the bucket can reach its rate.
    burst=$(python3 -c "import re,sys; m=re.fullmatch(r'([0-9.]+)([kmg]?)bit', sys.argv[1]); v=float(m[1])*{'':1,'k':1e3,'m':1e6,'g':1e9}[m[2]]; print(max(65536, int(v/8/1000)))" "$rate")
    if [ "$NETEM" = 1 ]; then
        "${tc[@]}" qdisc add dev "$dev" root handle 1: netem delay "$delay" limit 100000
        "${tc[@]}" qdisc add dev "$dev" parent 1:1 handle 10: tbf rate "$rate" burst "$burst" latency 50ms
    else
        "${tc[@]}" qdisc add dev "$dev" root tbf rate "$rate" burst "$burst" latency 50ms
    fi
}

case $cmd in
    up)
        n=${2:?netsim.sh up N PROFILE}
        read -r rate delay <<<"$(profile "${3:?netsim.sh up N PROFILE}")"
        NETEM=0
        if have_netem; then NETEM=1
        elif [ "${NETSIM_ALLOW_NO_DELAY:-0}" = 1 ]; then
            echo "netsim: this kernel ($(uname -r)) has no netem qdisc: shaping $rate only, NO $delay delay" >&2
        else
            echo "netsim: this kernel ($(uname -r)) has no netem qdisc, so no delay can be added (set NETSIM_ALLOW_NO_DELAY=1 to shape bandwidth only)" >&2
            exit 1
        fi
        ip link add "$bridge" type bridge
        ip addr add 10.77.0.254/24 dev "$bridge"
        ip link set "$bridge" up
        for i in $(seq 0 $((n - 1))); do
            ns=baton-ns$i
            ip netns add "$ns"
            ip link add "bv$i" type veth peer name "bn$i"
            ip link set "bn$i" netns "$ns"
            ip link set "bv$i" master "$bridge" up
            ip netns exec "$ns" ip addr add "10.77.0.$((i + 1))/24" dev "bn$i"
            ip netns exec "$ns" ip link set "bn$i" up
            ip netns exec "$ns" ip link set lo up
            shape "bv$i" "$rate" "$delay"
            shape "bn$i" "$rate" "$delay" "$ns"
        done
        echo "netsim: $n namespaces at 10.77.0.1-$n, $rate$([ "$NETEM" = 1 ] && echo " and $delay" || echo ", no delay") each way per veth" >&2
        ;;
    down)
        for ns in $(ip netns list | awk '/^baton-ns/ {print $1}'); do ip netns del "$ns"; done
        for dev in $(ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E '^bv[0-9]+$' || true); do ip link del "$dev" 2>/dev/null || true; done
        ip link del "$bridge" 2>/dev/null || true
        ;;
    exec)
        i=${2:?netsim.sh exec I CMD...}
        shift 2
        exec ip netns exec "baton-ns$i" "$@"
        ;;
    *) echo "netsim: unknown command \"$cmd\" (up, down, exec)" >&2; exit 2 ;;
esac
