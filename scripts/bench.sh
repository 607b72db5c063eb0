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
# Both packages name their example `bench`: run each through cargo (built once).
cargo build --locked --release -p fleetline-gateway --bins
bench() { cargo run --locked --release -q -p "$1" --example bench; }

summarize() {
    python3 -c '
import json, statistics, sys
name = sys.argv[1]
rows = [json.loads(l) for l in sys.stdin if l.startswith("{")]
r = sorted(x["ratio"] for x in rows)
print(json.dumps({"bench": name, "runs": len(r), "ratios": r,
                  "median": statistics.median(r), "min": r[0], "max": r[-1]}))
' "$1"
}

for _ in $(seq "$runs"); do bench fleetline-cloud; done | summarize cloud
for _ in $(seq "$runs"); do bench fleetline-gateway; done | summarize gateway
