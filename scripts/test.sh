#!/usr/bin/env bash
# The test command (README, .ci/run): installs the official openai Python client into a
# virtualenv under target/ (once), then runs every Rust test, unit and process-level.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/pyenv
if ! "$venv/bin/python" -c "import openai" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check openai
fi
export BATON_TEST_PYTHON="$PWD/$venv/bin/python"
cargo test --release --workspace "$@"
