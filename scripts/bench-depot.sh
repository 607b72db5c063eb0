#!/usr/bin/env bash
# One gateway and a depot's worth of units on this machine: 3,000, 8,000 and 15,000
# units at the demo's rate (the last one also killed and restarted: the connect
# storm), and 15,000 at night (a batch a minute). One JSON line per run. Not part of CI.
#
# Needs an open-file limit of about 20,000 for the gateway (each unit holds one
# descriptor there); the load generators split the units between processes.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo build --locked --release -p fleetline-gateway --bins --examples
bench="${CARGO_TARGET_DIR:-target}/release/examples/bench-depot"
"$bench" --units 3000
"$bench" --units 8000
"$bench" --units 15000 --storm
"$bench" --units 15000 --night
