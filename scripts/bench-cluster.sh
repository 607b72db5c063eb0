#!/usr/bin/env bash
# Throughput of the cloud as a cluster of 1, 2 and 3 nodes on this machine: the
# demo (release build) with a shared Mosquitto, the same fleet and seed, runs
# interleaved and repeated; prints each run, then per node count the median and
# spread of stored samples per second and of the end-to-end latency, and the
# ratio of each median to the one-node median of the same script run.
#
#   scripts/bench-cluster.sh [vehicles] [duration] [repeats]
set -euo pipefail
cd "$(dirname "$0")/.."
vehicles="${1:-1500}"
duration="${2:-30s}"
repeats="${3:-3}"
export PATH="$PATH:/usr/sbin"
cargo build --release --locked -q -p fleetline-sim
target="${CARGO_TARGET_DIR:-target}"
sim="$target/release/fleetline-sim"
out="$(mktemp -d -t fleetline-bench-cluster-XXXX)"
echo "vehicles=$vehicles duration=$duration repeats=$repeats cores=$(nproc) results in $out"
for r in $(seq 1 "$repeats"); do
    for n in 1 2 3; do
        dir="$out/n$n-r$r"
        "$sim" demo --vehicles "$vehicles" --duration "$duration" --seed 7 --cloud-nodes "$n" --shared-broker \
            --data-dir "$dir" --report-json "$dir.json" >/dev/null 2>"$dir.err" || echo "run n=$n r=$r exited $?"
        python3 - "$dir.json" "$n" "$r" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"nodes={sys.argv[2]} run={sys.argv[3]} stored/s={r['throughput_samples_per_s']:.0f} "
      f"e2e_p50={r['e2e_latency_ms']['p50']}ms e2e_p99={r['e2e_latency_ms']['p99']}ms "
      f"lost={r['samples_lost']} dup={r['samples_duplicated']} sent={r['samples_sent']}")
PY
    done
done
python3 - "$out" "$repeats" <<'PY'
import json, statistics, sys
out, repeats = sys.argv[1], int(sys.argv[2])
med = {}
for n in (1, 2, 3):
    runs = [json.load(open(f"{out}/n{n}-r{r}.json")) for r in range(1, repeats + 1)]
    tp = [x["throughput_samples_per_s"] for x in runs]
    p99 = [x["e2e_latency_ms"]["p99"] for x in runs]
    med[n] = statistics.median(tp)
    print(f"nodes={n}: stored/s median {med[n]:.0f} (min {min(tp):.0f}, max {max(tp):.0f}); "
          f"e2e p99 median {statistics.median(p99):.0f} ms (min {min(p99)}, max {max(p99)}); "
          f"ratio to 1 node {med[n] / med[1]:.2f}")
PY
