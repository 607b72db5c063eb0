#!/usr/bin/env bash
# tract against onnxruntime on the committed models: predictions/s per core and
# p50/p99 per batch, as ratios, in one run (models/bench_inference.py). Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked --release -q -p fleetline-inference --example score
[ -x .venv/bin/python ] && export PATH="$PWD/.venv/bin:$PATH"
python3 models/bench_inference.py --tract "${CARGO_TARGET_DIR:-target}/release/examples/score" "$@"
