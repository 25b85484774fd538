#!/usr/bin/env bash
# Baton's CPU engine beside llama.cpp on the same machine and model, run back to back.
#
# usage: scripts/bench-vs-llama-cpp.sh [RUNS]   (default 5)
#
# llama.cpp is built outside the repository (in $LLAMA_DIR, default /tmp/llama) from PyPI's
# llama-cpp-python sdist, which vendors it (GGML_NATIVE, so it uses this CPU's AVX-512 and
# AVX512_BF16); nothing of it is committed. The `bench` demo model is written as a bf16 GGUF by
# scripts/llama-cpp/to_gguf.py (numpy + gguf from PyPI). Each run: Baton exact, Baton bf16,
# llama-bench (pp512, tg128 at 1 and 2 threads), llama-batched-bench (batch 1, 8, 32). The
# figures land in $LLAMA_DIR/results/ and a summary is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
LLAMA_DIR=${LLAMA_DIR:-/tmp/llama}
LLAMA_VERSION=${LLAMA_VERSION:-0.3.36}
MODEL=${MODEL:-/tmp/bench}
mkdir -p "$LLAMA_DIR/results"
LL="$LLAMA_DIR/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp"
BIN="$LL/build/bin"

cargo build --release -p baton
BATON=target/release/baton
[ -f "$MODEL/model.safetensors" ] || $BATON gen-model --preset bench --out "$MODEL"

if [ ! -x "$LLAMA_DIR/venv/bin/python" ]; then
    python3 -m venv "$LLAMA_DIR/venv"
    "$LLAMA_DIR/venv/bin/pip" -q install --only-binary :all: numpy gguf
fi
if [ ! -x "$BIN/llama-bench" ]; then
    command -v cmake >/dev/null || { echo "needs cmake (apt-get install cmake)" >&2; exit 1; }
    (cd "$LLAMA_DIR" && "$LLAMA_DIR/venv/bin/pip" -q download --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_VERSION" -d . && tar xzf "llama_cpp_python-$LLAMA_VERSION.tar.gz")
    cmake -S "$LL" -B "$LL/build" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
    cmake --build "$LL/build" -j"$(nproc)" --target llama-bench llama-batched-bench >/dev/null
fi
GGUF="$LLAMA_DIR/bench-bf16.gguf"
[ -f "$GGUF" ] || "$LLAMA_DIR/venv/bin/python" scripts/llama-cpp/to_gguf.py "$MODEL" "$GGUF"

echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), $(nproc) vCPUs"
echo "flags: $(grep -o -w -E 'avx2|fma|f16c|avx512f|avx512bw|avx512vl|avx512dq|avx512_bf16|avx512_vnni' /proc/cpuinfo | sort -u | tr '\n' ' ')"
R="$LLAMA_DIR/results"
for run in $(seq 1 "$RUNS"); do
    for compute in exact bf16; do
        $BATON bench engine --model "$MODEL" --threads 2 --steps 64 --batch 1,8,32 --prefill-len 512 --compute $compute --json 2>/dev/null > "$R/baton-$compute-$run.json"
        $BATON bench engine --model "$MODEL" --threads 1 --steps 32 --batch 1 --prefill-len 16 --compute $compute --json 2>/dev/null > "$R/baton-$compute-t1-$run.json"
    done
    "$BIN/llama-bench" -m "$GGUF" -t 1,2 -p 512 -n 128 -r 3 -o json 2>/dev/null > "$R/llama-bench-$run.json"
    "$BIN/llama-batched-bench" -m "$GGUF" -t 2 -c 8192 -b 2048 -ub 512 -npp 64 -ntg 32 -npl 1,8,32 --output-format jsonl 2>/dev/null | grep '^{' > "$R/llama-batched-$run.jsonl"
    echo "run $run done"
done

python3 - "$R" "$RUNS" <<'EOF'
import json, sys, statistics
R, runs = sys.argv[1], int(sys.argv[2])
def rng(xs):
    return f"{min(xs):.1f} - {max(xs):.1f} (spread {100 * (max(xs) - min(xs)) / max(xs):.0f}%)"
rows = {}
floor = []
for run in range(1, runs + 1):
    for c in ("exact", "bf16"):
        b = json.load(open(f"{R}/baton-{c}-{run}.json"))
        t1 = json.load(open(f"{R}/baton-{c}-t1-{run}.json"))
        rows.setdefault(("prefill 512", c), []).append(b["prefill_tokens_per_s"])
        for d in b["decode"]:
            rows.setdefault((f"decode batch {d['batch']}, 2 threads", c), []).append(d["tokens_per_s"])
            if d["batch"] == 1:
                rows.setdefault(("batch 1 / floor", c), []).append(100 * d["fraction_of_floor"])
        rows.setdefault(("decode batch 1, 1 thread", c), []).append(t1["decode"][0]["tokens_per_s"])
        floor.append(b["floor_steps_per_s"])
    for r in json.load(open(f"{R}/llama-bench-{run}.json")):
        t = r["n_threads"]
        if r["n_prompt"] == 512 and t == 2:
            rows.setdefault(("prefill 512", "llama.cpp"), []).append(r["avg_ts"])
        if r["n_gen"] == 128:
            rows.setdefault((f"decode batch 1, {t} thread{'s' if t > 1 else ''}", "llama.cpp"), []).append(r["avg_ts"])
    for line in open(f"{R}/llama-batched-{run}.jsonl"):
        r = json.loads(line)
        if r["pl"] in (8, 32):
            rows.setdefault((f"decode batch {r['pl']}, 2 threads", "llama.cpp"), []).append(r["speed_tg"])
print(f"\n{runs} runs; bandwidth floor {rng(floor)} steps/s\n")
print("| | Baton exact | Baton bf16 | llama.cpp |")
print("|---|---|---|---|")
for name in ["decode batch 1, 2 threads", "batch 1 / floor", "decode batch 1, 1 thread", "decode batch 8, 2 threads", "decode batch 32, 2 threads", "prefill 512"]:
    cells = [rng(rows[(name, c)]) if (name, c) in rows else "" for c in ("exact", "bf16", "llama.cpp")]
    print(f"| {name} | " + " | ".join(cells) + " |")
EOF
