#!/usr/bin/env bash
# The test command (README, .ci/run): installs the official openai Python client and NVIDIA's
# NVRTC (from PyPI) into a virtualenv under target/ (once), then runs every Rust test, unit and
# process-level, then a 90-second chaos soak (scripts/chaos.sh: kills, heads included, and
# pauses under resuming clients; 0 failed, hung or mismatched), the deployments (a real
# one-machine Slurm running deploy/slurm/baton.sbatch; the Kubernetes manifests rendered,
# validated, and their start-node.sh scaling a mesh up and down on loopback), what operators
# look at (scripts/test-observability.sh: /dashboard in headless Chromium, `baton top` in tmux,
# a real Prometheus answering every query of the Grafana dashboard), and checks that
# the build without UCX still compiles.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/pyenv
if ! "$venv/bin/python" -c "import openai, nvidia.cu13" 2>/dev/null; then
    python3 -m venv "$venv"
    # openai: the client-compatibility test; nvidia-cuda-nvrtc: compile-checks kernels/ (no GPU needed).
    "$venv/bin/pip" install --quiet --disable-pip-version-check openai nvidia-cuda-nvrtc
fi
export BATON_TEST_PYTHON="$PWD/$venv/bin/python"
nvrtc_lib=$("$venv/bin/python" -c "import nvidia.cu13, os; print(os.path.join(list(nvidia.cu13.__path__)[0], 'lib'))")
export LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cargo test --release --workspace "$@"
# The chaos soak's short version, on the binary the tests just built.
NO_BUILD=1 bash scripts/chaos.sh 1.5 1
# Deployments, on the same binary: Slurm (installs slurm-wlm and munge if missing) and Kubernetes.
bash scripts/test-slurm.sh
bash scripts/test-kubernetes.sh
# The dashboard in Chromium, `baton top` in tmux, Prometheus and the Grafana dashboard's queries.
bash scripts/test-observability.sh
# The build without UCX (activations over QUIC streams) must keep compiling.
cargo check --release -q -p baton --no-default-features
