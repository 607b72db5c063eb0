#!/usr/bin/env bash
# Runs the cloud and gateway benchmarks N times each (default 5) and prints, per
# benchmark, every run's ratio against its in-process baseline and their median and
# spread (min–max). Not part of CI.
#
#   scripts/bench.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin"
runs="${1:-5}"
target="${CARGO_TARGET_DIR:-target}"
cargo build --locked --release -p fleetline-cloud -p fleetline-gateway --bins --examples

summarize() {
    python3 -c '
import json, statistics, sys
name = sys.argv[1]
rows = [json.loads(l) for l in sys.stdin if l.startswith("{")]
if not rows:
    sys.exit(f"no results from the {name} benchmark")
r = sorted(x["ratio"] for x in rows)
print(json.dumps({"bench": name, "runs": len(r), "ratios": r,
                  "median": statistics.median(r), "min": r[0], "max": r[-1]}))
' "$1"
}

# Every run must print its line: a failed run stops the script rather than
# shrinking the sample.
for _ in $(seq "$runs"); do "$target/release/examples/bench-cloud" || exit 1; done | summarize cloud
for _ in $(seq "$runs"); do "$target/release/examples/bench-gateway" || exit 1; done | summarize gateway
