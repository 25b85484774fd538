#!/usr/bin/env bash
# The mesh benchmark on this machine: a three-stage pipeline of `baton node` processes on
# loopback (the `bench` preset split 10/10/10 layers), once per tensor plane (UCX shared memory,
# UCX TCP, QUIC with steps down the chain of stages, QUIC relayed through the head), against
# `baton serve` on the same model; `baton bench` at concurrency 1 and 8.
# Prints one JSON line per run, tagged with the setup, and per pipeline the head's
# pipeline_transfer_time_seconds (what the tensor plane cost per step).
#   scripts/bench-pipeline.sh [OUTPUT_LEN] [PLANES]     PLANES default: "ucx:shm ucx:tcp quic quic-relay"
set -euo pipefail
cd "$(dirname "$0")/.."
output_len=${1:-64}
planes=${2:-"ucx:shm ucx:tcp quic quic-relay"}
baton=$PWD/target/release/baton
cargo build --release -q -p baton
work=$(mktemp -d /tmp/baton-bench-pipeline.XXXXXX)
pids=()
stop() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done; pids=(); }
trap 'stop; rm -rf "$work"' EXIT
cat > "$work/cluster.toml" <<TOML
[cluster]
name = "bench"
[model]
path = "demo:bench"
[tls]
dir = "tls"
[placement]
mode = "auto"
[[nodes]]
name = "node-a"
control = "127.0.0.1:17101"
http = "127.0.0.1:17080"
memory_gb = 1
[[nodes]]
name = "node-b"
control = "127.0.0.1:17102"
memory_gb = 1
[[nodes]]
name = "node-c"
control = "127.0.0.1:17103"
memory_gb = 1
TOML
"$baton" cluster init "$work/cluster.toml" >/dev/null
wait_ready() {
    for _ in $(seq 1 900); do curl -sf "http://$1/health" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "bench-pipeline: $1 never became ready (logs in $work)" >&2; exit 1
}
run_bench() {
    for c in 1 8; do
        n=$(( c == 1 ? 8 : 16 ))
        "$baton" bench --url "http://$1" --concurrency "$c" --num-requests "$n" --warmup 2 --input-len 128 \
            --output-len "$output_len" --json | sed "s/^{/{\"setup\":\"$2\",/"
    done
}
for plane in $planes; do
    kind=${plane%%:*}; tls=${plane#*:}; [ "$tls" = "$plane" ] && tls=""
    links=chain
    if [ "$plane" = quic-relay ]; then kind=quic; links=relay; fi
    for n in node-c node-b node-a; do
        UCX_TLS=$tls "$baton" node --cluster "$work/cluster.toml" --name $n --threads 2 --tensor-plane "$kind" --stage-links $links 2>"$work/$n-$plane.log" &
        pids+=($!)
    done
    wait_ready 127.0.0.1:17080
    run_bench 127.0.0.1:17080 "3 stages, $plane"
    # What the tensor plane cost per step (remote calls beyond the stages' compute), and the step.
    curl -s http://127.0.0.1:17080/v1/stats | python3 -c '
import json, sys
h = json.load(sys.stdin)["histograms"]
t, f = h["pipeline_transfer_time_seconds"], h["forward_time_seconds"]
print(json.dumps({"setup": sys.argv[1], "steps": t["count"], "transfer_p50_us": t["p50"] * 1e6, "transfer_p99_us": t["p99"] * 1e6,
                  "transfer_mean_us": t["mean"] * 1e6, "step_mean_ms": f["mean"] * 1e3}))' "3 stages, $plane"
    stop
done
"$baton" serve --preset bench --listen 127.0.0.1:17090 --no-quic --threads 2 2>"$work/serve.log" &
pids+=($!)
wait_ready 127.0.0.1:17090
run_bench 127.0.0.1:17090 "one node"
