#!/usr/bin/env bash
# The elastic-mesh benchmark on this machine: a three-node pipeline of `baton node` processes on
# loopback (the `bench` preset, 30 layers split 10/10/10, UCX over TCP), under streaming load
# from `baton bench` (concurrency 8). KILLS times (default 10), alternately node-b and node-c:
#   kill -9 the node mid-load; time from the kill to the head's decision (polled from /v1/mesh
#   every 10 ms) and to serving again (the shard ready under the new plan, /metrics
#   plan_change_seconds); the longest gap between two tokens of any stream of that load
#   (`baton bench`'s itl max) and its failed requests. Then the node is started again and taken
#   back (a join) under a fresh load: the same gap and failures for the join. First, the same
#   load with nothing happening (its longest gap is the baseline the others compare with).
# SOAK seconds (default 0): afterwards, full CPU load for that long with nobody killed; prints
# the plan changes seen (false failure detections).
#   scripts/bench-failover.sh [KILLS] [SOAK]
# Prints one JSON line per event and a summary line; KEEP=1 keeps the nodes' logs.
set -euo pipefail
cd "$(dirname "$0")/.."
kills=${1:-10}
soak=${2:-0}
baton=$PWD/target/release/baton
cargo build --release -q -p baton
work=$(mktemp -d /tmp/baton-bench-failover.XXXXXX)
declare -A pid
stop() { for p in "${pid[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap 'stop; [ -n "${KEEP:-}" ] && echo "logs kept in $work" >&2 || rm -rf "$work"' EXIT
head=127.0.0.1:17280
cat > "$work/cluster.toml" <<TOML
[cluster]
name = "bench-failover"
[model]
path = "demo:bench"
[tls]
dir = "tls"
[[nodes]]
name = "node-a"
control = "127.0.0.1:17201"
http = "$head"
memory_gb = 1
[[nodes]]
name = "node-b"
control = "127.0.0.1:17202"
memory_gb = 1
[[nodes]]
name = "node-c"
control = "127.0.0.1:17203"
memory_gb = 1
TOML
"$baton" cluster init "$work/cluster.toml" >/dev/null
start() { UCX_TLS=tcp "$baton" node --cluster "$work/cluster.toml" --name "$1" --threads 1 2>>"$work/$1.log" & pid[$1]=$!; }
for n in node-c node-b node-a; do start $n; done
for _ in $(seq 1 1200); do curl -sf "http://$head/health" >/dev/null 2>&1 && break; sleep 0.1; done
curl -sf "http://$head/health" >/dev/null || { echo "bench-failover: the head never became ready (logs in $work)" >&2; exit 1; }
now() { date +%s.%N; }
epoch() { curl -sf "http://$head/v1/mesh" | python3 -c 'import json,sys; print(json.load(sys.stdin)["epoch"] or 0)'; }
state_of() { curl -sf "http://$head/v1/mesh" | python3 -c "import json,sys; print(next(n['state'] for n in json.load(sys.stdin)['nodes'] if n['name']=='$1'))"; }
metric() { curl -sf "http://$head/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
# A load of 8 streams at a time, long enough to span the event; its JSON goes to $1.
load() { "$baton" bench --url "http://$head" --concurrency 8 --num-requests 24 --warmup 0 --input-len 64 --output-len 160 --json > "$1" 2>/dev/null & }
gap() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["itl_ms"]["max"], d["failed"], d["requests"])' "$1"; }
# The same load with nothing happening: the longest inter-token gap it has anyway.
load "$work/baseline.json"; wait $! || true
read -r bgap bfailed bok < <(gap "$work/baseline.json")
echo "{\"baseline_gap_ms\": $bgap, \"baseline_failed\": $bfailed, \"baseline_ok\": $bok}"
total_failed=$bfailed
for i in $(seq 1 "$kills"); do
    victim=$([ $((i % 2)) -eq 1 ] && echo node-b || echo node-c)
    before=$(epoch); changes_before=$(metric baton:plan_change_seconds_count)
    load "$work/kill-$i.json"; bench=$!
    sleep 3
    t0=$(now); kill -9 "${pid[$victim]}"; wait "${pid[$victim]}" 2>/dev/null || true
    while [ "$(epoch)" = "$before" ]; do sleep 0.01; done; t1=$(now)
    while [ "$(metric baton:plan_change_seconds_count)" = "$changes_before" ]; do sleep 0.01; done; t2=$(now)
    wait $bench || true
    read -r kgap kfailed kok < <(gap "$work/kill-$i.json")
    # The node comes back and is taken in (its backoff doubles with every loss) under a new load.
    start $victim
    while [ "$(state_of $victim)" != "spare" ]; do sleep 0.05; done
    load "$work/join-$i.json"; bench=$!
    t3=$(now)
    while [ "$(state_of $victim)" != "serving" ]; do sleep 0.05; done; t4=$(now)
    wait $bench || true
    read -r jgap jfailed jok < <(gap "$work/join-$i.json")
    total_failed=$((total_failed + kfailed + jfailed))
    python3 -c "import json,sys; a=sys.argv[1:]; print(json.dumps({'kill': int(a[0]), 'node': a[1], 'detect_s': round(float(a[3])-float(a[2]),3), 'serving_again_s': round(float(a[4])-float(a[2]),3), 'kill_gap_ms': float(a[5]), 'kill_failed': int(a[6]), 'kill_ok': int(a[7]), 'join_wait_s': round(float(a[9])-float(a[8]),2), 'join_gap_ms': float(a[10]), 'join_failed': int(a[11]), 'join_ok': int(a[12])}))" \
        "$i" "$victim" "$t0" "$t1" "$t2" "$kgap" "$kfailed" "$kok" "$t3" "$t4" "$jgap" "$jfailed" "$jok"
done
echo "{\"kills\": $kills, \"failed_requests\": $total_failed, \"plan_change_seconds\": \"$(metric baton:plan_change_seconds_sum)/$(metric baton:plan_change_seconds_count)\"}"
if [ "$soak" -gt 0 ]; then
    changes=$(curl -sf "http://$head/metrics" | awk '/^baton:plan_changes_total/ {s += $2} END {print s}')
    end=$(( $(date +%s) + soak )); runs=0; failed=0
    while [ "$(date +%s)" -lt "$end" ]; do
        "$baton" bench --url "http://$head" --concurrency 8 --num-requests 16 --warmup 0 --input-len 64 --output-len 64 --json > "$work/soak.json" 2>/dev/null || true
        failed=$((failed + $(python3 -c 'import json; print(json.load(open("'"$work/soak.json"'"))["failed"])')))
        runs=$((runs + 1))
    done
    after=$(curl -sf "http://$head/metrics" | awk '/^baton:plan_changes_total/ {s += $2} END {print s}')
    echo "{\"soak_s\": $soak, \"load_runs\": $runs, \"failed_requests\": $failed, \"false_detections\": $((after - changes))}"
fi
