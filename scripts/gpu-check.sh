#!/usr/bin/env bash
# The CUDA backend on a GPU machine (no Rust toolchain needed there). Build here first:
#   cargo build --release -p baton-cuda --example gpu_check && cargo build --release -p baton
# then on the device machine, with target/release/examples/gpu_check and target/release/baton
# carried along:
#   scripts/gpu-check.sh
# It (1) compares every backend operation on random inputs with the CPU backend, (2) runs the
# Hugging Face parity fixtures on the GPU, (3) compares greedy generation with the CPU backend,
# (4) times decode (batch 1, 8, 32) and prefill on the `bench` and `llama-1b` demo models beside
# the HBM floor, and (5) times Hugging Face transformers on the same GPU and models.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/baton-gpu-check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt" || true
# NVRTC and cuBLAS: a CUDA install, or the nvidia-* wheels PyTorch brings (every nvidia/*/lib).
nvlibs=$(python3 - <<'PY' 2>/dev/null || true
import glob, os, site
dirs = []
for sp in site.getsitepackages():
    dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "lib")))
print(":".join(dirs))
PY
)
export LD_LIBRARY_PATH="${nvlibs:+$nvlibs:}/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
for preset in bench llama-1b; do
    [ -f "$out/$preset/config.json" ] || target/release/baton gen-model --preset "$preset" --out "$out/$preset"
done
target/release/examples/gpu_check tests/fixtures/parity "$out/bench" "$out/llama-1b" | tee "$out/gpu_check.jsonl"
python3 - "$out/bench" "$out/llama-1b" <<'PY' | tee "$out/hf_baseline.jsonl"
# Hugging Face transformers on the same GPU and models: greedy decode tokens/s at batch 1.
import json, sys, time
import torch
from transformers import AutoModelForCausalLM
for path in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    for batch in (1, 8, 32):
        ids = torch.randint(10, 1000, (batch, 64), device="cuda")
        with torch.no_grad():
            model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
            torch.cuda.synchronize()
            t = time.time()
            model.generate(ids, max_new_tokens=64, do_sample=False, min_new_tokens=64)
            torch.cuda.synchronize()
        dt = time.time() - t
        print(json.dumps({"check": "hf_timing", "model": path, "batch": batch, "tokens_per_s": batch * 64 / dt}))
PY
