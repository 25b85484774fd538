#!/usr/bin/env bash
# Fuzzes every decoder of network bytes (fuzz/fuzz_targets/: the QUIC client protocol, the stage
# wire, control messages, gossip packets) with cargo-fuzz (libFuzzer, AddressSanitizer), each
# for a bounded time, from seeds of one valid message of every kind (baton-mesh's fuzz_seeds
# example). Not part of CI. Prints each target's executions and crashes; a crash leaves its input
# under fuzz/artifacts/TARGET/ and makes the script exit non-zero.
#   scripts/fuzz.sh [SECONDS per target (default 60)] [TARGET...]
# cargo-fuzz needs nightly's -Z flags: on a stable toolchain RUSTC_BOOTSTRAP=1 allows them.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(client_protocol stage_wire control_message gossip_packet)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
corpus=target/fuzz-corpus
cargo run --release -q -p baton-mesh --example fuzz_seeds -- "$corpus" >/dev/null
status=0
for t in "${targets[@]}"; do
    log=target/fuzz-$t.log
    set +e
    cargo fuzz run --fuzz-dir fuzz "$t" "$corpus/$t" -- -max_total_time="$seconds" -rss_limit_mb=4096 -print_final_stats=1 > "$log" 2>&1
    rc=$?
    set -e
    execs=$(awk '/^stat::number_of_executed_units/ {print $2}' "$log")
    crashes=$(ls fuzz/artifacts/"$t" 2>/dev/null | wc -l)
    echo "fuzz: $t: ${execs:-?} executions in $seconds s, corpus $(ls "$corpus/$t" | wc -l) inputs, $crashes crash input(s), exit $rc (log $log)"
    [ "$rc" = 0 ] && [ "$crashes" = 0 ] || status=1
done
exit $status
