#!/usr/bin/env bash
# A dead pipeline head, timed: a fresh three-node pipeline on loopback (the `bench` preset, 30
# layers 10/10/10, UCX over TCP) under streaming load entering at node-b (`baton bench`,
# concurrency 8, 160 tokens per request), and node-a, the head, killed (`kill -9`) 3 s in.
# Per run: the time from the kill to node-b heading the pipeline (its log), the longest gap
# between two tokens any client saw (bench's ITL max: detection + the new head's load +
# re-prefill), the same load's gap with nothing killed (the baseline), and failed requests.
#   scripts/bench-head-failover.sh [RUNS (default 3)]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
baton=$PWD/target/release/baton
[ -n "${NO_BUILD:-}" ] || cargo build --release -q -p baton
gap() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["itl_ms"]["max"], d["failed"], d["requests"])' "$1"; }
for r in $(seq 1 "$runs"); do
    work=$(mktemp -d /tmp/baton-bench-head.XXXXXX)
    declare -A pid=()
    cat > "$work/cluster.toml" <<TOML
[cluster]
name = "bench-head"
[model]
path = "demo:bench"
[tls]
dir = "tls"
[[nodes]]
name = "node-a"
control = "127.0.0.1:17301"
http = "127.0.0.1:17380"
memory_gb = 1
[[nodes]]
name = "node-b"
control = "127.0.0.1:17302"
http = "127.0.0.1:17390"
memory_gb = 1
[[nodes]]
name = "node-c"
control = "127.0.0.1:17303"
memory_gb = 1
TOML
    "$baton" cluster init "$work/cluster.toml" >/dev/null
    for n in node-c node-b node-a; do
        UCX_TLS=tcp "$baton" node --cluster "$work/cluster.toml" --name $n --threads 1 2>>"$work/$n.log" &
        pid[$n]=$!
    done
    trap 'for p in "${pid[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true' EXIT
    for _ in $(seq 1 1200); do curl -sf http://127.0.0.1:17390/health >/dev/null 2>&1 && break; sleep 0.1; done
    load() { "$baton" bench --url http://127.0.0.1:17390 --concurrency 8 --num-requests 24 --warmup 0 --input-len 64 --output-len 160 --json > "$1" 2>/dev/null; }
    load "$work/baseline.json" || true
    load "$work/kill.json" & bench=$!
    sleep 3
    t0=$(date +%s.%N); kill -9 "${pid[node-a]}"; wait "${pid[node-a]}" 2>/dev/null || true
    until grep -q "heads the pipeline now" "$work/node-b.log"; do sleep 0.01; done
    t1=$(date +%s.%N)
    wait $bench || true
    read -r bgap _ _ < <(gap "$work/baseline.json")
    read -r kgap kfailed kok < <(gap "$work/kill.json")
    python3 -c "import json,sys; print(json.dumps({'run': $r, 'to_new_head_s': round($t1 - $t0, 3), 'longest_gap_ms': $kgap, 'baseline_gap_ms': $bgap, 'failed': $kfailed, 'requests': $kok}))"
    for p in "${pid[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    trap - EXIT
    rm -rf "$work"
done
