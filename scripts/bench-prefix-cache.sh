#!/usr/bin/env bash
# The shared-prefix benchmark (BENCHMARKS.md "Prefix caching"): every prompt is one of
# NUM_PREFIXES shared prefixes of 1,024 tokens plus 64 unique tokens, 64 output tokens, on the
# embedded demo model (SmolLM2-135M's shape, CPU).
#   1. one node (`baton serve`, 2 threads): prefix caching on vs off, at each concurrency;
#   2. two replicas (two `baton node`s, 1 thread each, requests entering at the first head):
#      cache-aware vs least-loaded routing, beside one replica with the same KV cache; with
#      each head's share of the requests.
#   scripts/bench-prefix-cache.sh [PART] [CONCURRENCIES]      PART: single, replicas or all
# NUM_PREFIXES (default 1) and KV_MB (each node's KV cache, default 1024) shape part 2:
# NUM_PREFIXES=8 KV_MB=280 gives each replica room for about 5 of the 8 prefixes.
# One JSON line per run (baton bench's, plus "setup" and, for replicas, "heads").
set -euo pipefail
cd "$(dirname "$0")/.."
part=${1:-all}
conc_list=${2:-"1 4"}
requests=${REQUESTS:-16}
prefixes=${NUM_PREFIXES:-1}
kv_mb=${KV_MB:-1024}
baton=$PWD/target/release/baton
cargo build --release -q -p baton
work=$(mktemp -d /tmp/baton-bench-prefix.XXXXXX)
pids=()
stop() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    pids=()
}
trap 'stop; rm -rf "$work"' EXIT
wait_ready() {
    for _ in $(seq 1 600); do curl -sf "http://$1/health" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "bench-prefix-cache: $1 never became ready (logs in $work)" >&2; trap - EXIT; stop; exit 1
}
bench() { # URL CONCURRENCY
    "$baton" bench --url "http://$1" --shared-prefix-len 1024 --num-prefixes "$prefixes" --input-len 64 --output-len 64 \
        --concurrency "$2" --num-requests "$requests" --warmup "$(( $2 > 2 ? $2 : 2 ))" --seed 1 --json
}
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
requests_at() { # the requests a head finished so far
    curl -sf "http://$1/v1/stats" | python3 -c 'import json,sys; print(sum(json.load(sys.stdin)["requests"].values()))'
}

if [ "$part" = single ] || [ "$part" = all ]; then
    for caching in on off; do
        flag=""; [ "$caching" = off ] && flag=--no-enable-prefix-caching
        for c in $conc_list; do
            p=$(port)
            "$baton" serve --listen "127.0.0.1:$p" --no-quic --threads 2 --kv-cache-mb "$kv_mb" $flag 2>"$work/serve.log" & pids+=($!)
            wait_ready "127.0.0.1:$p"
            out=$(bench "127.0.0.1:$p" "$c")
            echo "$out" | python3 -c "import json,sys; r=json.load(sys.stdin); r['setup']='one node, caching $caching'; print(json.dumps(r))"
            stop
        done
    done
fi

if [ "$part" = replicas ] || [ "$part" = all ]; then
    model=$work/model
    "$baton" gen-model --preset bench --out "$model" >/dev/null 2>&1
    for c in $conc_list; do
        # One replica with the same cache: the hit rate to keep.
        p=$(port)
        "$baton" serve --model "$model" --listen "127.0.0.1:$p" --no-quic --threads 2 --kv-cache-mb "$kv_mb" 2>"$work/serve.log" & pids+=($!)
        wait_ready "127.0.0.1:$p"
        bench "127.0.0.1:$p" "$c" | python3 -c "import json,sys; r=json.load(sys.stdin); r['setup']='one replica'; print(json.dumps(r))"
        stop
        for policy in cache_aware least_loaded; do
            h0=$(port); h1=$(port)
            cat >"$work/cluster.toml" <<TOML
[cluster]
name = "prefix-bench"
[model]
path = "$model"
[placement]
mode = "auto"
replicas = 2
[routing]
policy = "$policy"
[[nodes]]
name = "r0"
control = "127.0.0.1:$(port)"
http = "127.0.0.1:$h0"
memory_gb = 1
replica = 0
[[nodes]]
name = "r1"
control = "127.0.0.1:$(port)"
http = "127.0.0.1:$h1"
memory_gb = 1
replica = 1
TOML
            "$baton" cluster init "$work/cluster.toml" >/dev/null
            for n in r0 r1; do
                "$baton" node --cluster "$work/cluster.toml" --name $n --threads 1 --kv-cache-mb "$kv_mb" 2>"$work/$n.log" & pids+=($!)
            done
            wait_ready "127.0.0.1:$h0"; wait_ready "127.0.0.1:$h1"
            # Let the heads see each other (the front polls loads every 200 ms).
            sleep 1
            b0=$(requests_at "127.0.0.1:$h0"); b1=$(requests_at "127.0.0.1:$h1")
            out=$(bench "127.0.0.1:$h0" "$c")
            a0=$(requests_at "127.0.0.1:$h0"); a1=$(requests_at "127.0.0.1:$h1")
            echo "$out" | python3 -c "import json,sys; r=json.load(sys.stdin); r['setup']='two replicas, $policy'; r['heads']={'r0': $a0-$b0, 'r1': $a1-$b1}; print(json.dumps(r))"
            stop
        done
    done
fi
