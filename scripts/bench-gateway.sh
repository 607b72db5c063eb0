#!/usr/bin/env bash
# Gateway throughput against a Mosquitto bridge on this machine; prints one JSON line.
# Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin"
cargo build --locked --release -p fleetline-gateway --bins --examples
"${CARGO_TARGET_DIR:-target}/release/examples/bench-gateway"
