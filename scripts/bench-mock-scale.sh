#!/usr/bin/env bash
# The scaling benchmark: Llama-3-70B (config only) on N modeled H100s (`devices =
# ["mock:h100"]`), N = 1 (one card with its memory lifted, `mock:h100:1024GiB`: the baseline),
# and N stages of `baton node`; `baton bench` at each concurrency. Per run, one JSON line:
# aggregate output tokens/s, TTFT and ITL p50/p99, and each stage's busy share (its device's
# time in steps over the run's wall time, from `baton status --json`).
#   scripts/bench-mock-scale.sh [STAGES] [CONCURRENCIES] [LINKS] [OUTPUT_LEN]
#   defaults: "1 2 4 8 16"  "1 4 16 64 256"  chain  64         (LINKS: chain or relay)
# REBALANCE=true lets the head move layers by measured speed (default false: on two shared
# cores every node's calls stall, and the moves that follow measure the planner, not the pipe).
# NET=rack|wan|RATE,DELAY puts each node in its own network namespace on a shaped link
# (scripts/netsim.sh; root); unset, the nodes talk over loopback.
# Every node shares this machine's cores: see BENCHMARKS.md for what that costs.
set -euo pipefail
cd "$(dirname "$0")/.."
stages_list=${1:-"1 2 4 8 16"}
conc_list=${2:-"1 4 16 64 256"}
links=${3:-chain}
output_len=${4:-64}
net=${NET:-loopback}
# The running batch's cap (vLLM's default), on the baseline and on the pipeline's head alike.
max_seqs=${MAX_NUM_SEQS:-256}
rebalance=${REBALANCE:-false}
baton=$PWD/target/release/baton
netsim=$PWD/scripts/netsim.sh
cargo build --release -q -p baton
work=$(mktemp -d /tmp/baton-bench-scale.XXXXXX)
model=$work/70b
"$baton" gen-model --preset llama3-70b --config-only --out "$model" 2>/dev/null
pids=()
stop() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    pids=()
    [ "$net" = loopback ] || "$netsim" down
}
trap 'stop; rm -rf "$work"' EXIT
wait_ready() {
    for _ in $(seq 1 1800); do curl -sf "http://$1/health" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "bench-mock-scale: $1 never became ready (logs in $work)" >&2; trap - EXIT; stop; exit 1
}
# Busy seconds of every node, as JSON {"node-0": s, ...} (N = 1: none, one process).
busy() {
    [ -f "$work/cluster.toml" ] || { echo '{}'; return; }
    "$baton" status --cluster "$work/cluster.toml" --json 2>/dev/null \
        | python3 -c 'import json,sys; print(json.dumps({r["node"]: r.get("busy_seconds") for r in json.load(sys.stdin)["nodes"]}))'
}
run() { # $1 url, $2 N, $3 concurrency
    local c=$3 n=$(( $3 * 2 > 8 ? $3 * 2 : 8 ))
    local b0 t0 out b1 t1
    # Warm up apart, so the busy shares cover the measured requests only.
    "$baton" bench --url "http://$1" --concurrency 1 --num-requests 1 --warmup 0 --input-len 128 --output-len 4 --json >/dev/null
    b0=$(busy); t0=$(date +%s.%N)
    out=$("$baton" bench --url "http://$1" --concurrency "$c" --num-requests "$n" --warmup 0 \
        --input-len 128 --output-len "$output_len" --max-token-id 100000 --json)
    t1=$(date +%s.%N); b1=$(busy)
    python3 - "$out" "$b0" "$b1" "$t0" "$t1" "$2" "$c" "$links" "$net" <<'PY'
import json, sys
r, b0, b1 = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
wall = float(sys.argv[5]) - float(sys.argv[4])
busy = {k: round((b1[k] - b0[k]) / wall, 3) for k in b1 if b1.get(k) is not None and b0.get(k) is not None}
print(json.dumps({"stages": int(sys.argv[6]), "concurrency": int(sys.argv[7]), "links": sys.argv[8], "net": sys.argv[9],
                  "output_tok_s": r["output_tokens_per_s"], "ttft_ms": r["ttft_ms"], "itl_ms": r["itl_ms"],
                  "errors": r["failed"], "busy": busy, "bench": r}), flush=True)
PY
}
for n in $stages_list; do
    rm -f "$work/cluster.toml"
    if [ "$n" = 1 ]; then
        "$baton" serve --model "$model" --device mock:h100:1024GiB --max-num-seqs "$max_seqs" --listen 127.0.0.1:17280 --no-quic 2>"$work/serve.log" &
        pids+=($!)
        http=127.0.0.1:17280
    else
        # in_ns execs the node, so the pid kept for stop() is the node's own.
        if [ "$net" = loopback ]; then
            addr() { echo "127.0.0.1:$((17300 + $1))"; }; http=127.0.0.1:17280
            in_ns() { shift; exec "$@"; }
        else
            "$netsim" up "$n" "$net"
            addr() { echo "10.77.0.$(($1 + 1)):7300"; }; http=10.77.0.1:8080
            in_ns() { local i=$1; shift; exec "$netsim" exec "$i" "$@"; }
        fi
        {
            printf '[cluster]\nname = "scale"\n[model]\npath = "%s"\n[tls]\ndir = "tls"\n[placement]\nmode = "auto"\nrebalance = %s\n' "$model" "$rebalance"
            for i in $(seq 0 $((n - 1))); do
                printf '[[nodes]]\nname = "node-%d"\ncontrol = "%s"\nmemory_gb = 80\ndevices = ["mock:h100"]\n' "$i" "$(addr "$i")"
                [ "$i" = 0 ] && printf 'http = "%s"\n' "$http"
            done
        } > "$work/cluster.toml"
        "$baton" cluster init "$work/cluster.toml" >/dev/null
        for i in $(seq $((n - 1)) -1 0); do
            in_ns "$i" "$baton" node --cluster "$work/cluster.toml" --name "node-$i" --tensor-plane quic --stage-links "$links" --max-num-seqs "$max_seqs" 2>"$work/node-$i-$n.log" &
            pids+=($!)
        done
    fi
    wait_ready "$http"
    for c in $conc_list; do run "$http" "$n" "$c"; done
    # Plan changes the head made while measuring (a rebalance moves layers and their KV).
    [ "$n" = 1 ] || grep -h '^baton: plan epoch [0-9]* (' "$work/node-0-$n.log" >&2 || true
    stop
done
