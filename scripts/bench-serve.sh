#!/usr/bin/env bash
# Serving benchmark on this machine: starts `baton serve` on a demo model, runs `baton bench`
# at several concurrencies, prints one JSON line per run plus the server's scheduler overhead.
#   scripts/bench-serve.sh [PRESET] [CONCURRENCIES] [INPUT_LEN] [OUTPUT_LEN] [REQUESTS_PER_STREAM]
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-bench}
concurrencies=${2:-"1 8 32 64"}
input_len=${3:-128}
output_len=${4:-128}
per_stream=${5:-2}
baton=target/release/baton
cargo build --release -q -p baton
port=18900
$baton serve --preset "$preset" --listen 127.0.0.1:$port --no-quic --threads 2 --max-num-seqs 64 --max-batched-tokens 512 2>/tmp/baton-bench-serve.log &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
    curl -sf http://127.0.0.1:$port/health >/dev/null 2>&1 && break
    sleep 0.1
done
for c in $concurrencies; do
    n=$(( c * per_stream )); [ "$n" -lt 8 ] && n=8
    $baton bench --url http://127.0.0.1:$port --concurrency "$c" --num-requests "$n" --warmup 2 \
        --input-len "$input_len" --output-len "$output_len" --json
done
curl -s http://127.0.0.1:$port/v1/stats | python3 -c '
import json, sys
s = json.load(sys.stdin)["histograms"]
it, sc, fw = s["iteration_time_seconds"], s["scheduler_time_seconds"], s["forward_time_seconds"]
print(json.dumps({"iterations": it["count"], "iteration_mean_ms": it["mean"] * 1e3, "forward_mean_ms": fw["mean"] * 1e3,
                  "scheduler_mean_ms": sc["mean"] * 1e3,
                  "scheduler_share_of_forward": sc["mean"] / fw["mean"] if fw["mean"] else None}))'
