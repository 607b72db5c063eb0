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

# Both packages name their example `bench`: take each one's path from cargo.
paths=$(cargo build --locked --release -p fleetline-cloud -p fleetline-gateway --bins --examples \
    --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "bench" and m.get("executable"):
        pkg = "cloud" if "cloud-cluster" in m["manifest_path"] else "gateway"
        print(pkg, m["executable"])
')
cloud=$(awk '$1 == "cloud" {print $2}' <<<"$paths")
gateway=$(awk '$1 == "gateway" {print $2}' <<<"$paths")

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

for _ in $(seq "$runs"); do "$cloud"; done | summarize cloud
for _ in $(seq "$runs"); do "$gateway"; done | summarize gateway
