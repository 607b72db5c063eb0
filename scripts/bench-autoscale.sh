#!/usr/bin/env bash
# The autoscaler against a fixed-size cluster on this machine: the demo (release
# build) with the surge profile, the same fleet and seed, once with one cloud node
# (a cluster of one on a shared Mosquitto) and once with --autoscale from one
# node, interleaved and repeated. Prints each run (node counts reached, peak, the
# scale steps, end-to-end latency, exactly-once), then per variant the median and
# spread of the end-to-end latency and the ratio of the autoscaled median to the
# fixed one.
#
#   scripts/bench-autoscale.sh [vehicles] [duration] [repeats] [target-rate]
set -euo pipefail
cd "$(dirname "$0")/.."
vehicles="${1:-600}"
duration="${2:-90s}"
repeats="${3:-3}"
rate="${4:-15000}"
export PATH="$PATH:/usr/sbin"
cargo build --release --locked -q -p fleetline-sim
target="${CARGO_TARGET_DIR:-target}"
sim="$target/release/fleetline-sim"
out="$(mktemp -d -t fleetline-bench-autoscale-XXXX)"
echo "vehicles=$vehicles duration=$duration repeats=$repeats target-rate=$rate cores=$(nproc) results in $out"
for r in $(seq 1 "$repeats"); do
    for v in fixed auto; do
        dir="$out/$v-r$r"
        extra=(--shared-broker)
        [ "$v" = auto ] && extra=(--autoscale --min-nodes 1 --max-nodes 3 --target-rate "$rate"
            --scale-down-stabilization 10s --scale-down-every 10s)
        "$sim" demo --vehicles "$vehicles" --duration "$duration" --seed 11 --profile surge --cloud-nodes 1 \
            "${extra[@]}" --data-dir "$dir" --report-json "$dir.json" >/dev/null 2>"$dir.err" \
            || echo "run $v r=$r exited $?"
        python3 - "$dir.json" "$v" "$r" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
a = r.get("autoscale") or {}
rates = [p["rate"] for p in a.get("timeline", [])]
print(f"{sys.argv[2]:5} run={sys.argv[3]} nodes={a.get('node_counts', [1])} peak={a.get('peak_nodes', 1)} "
      f"peak_rate={max(rates) if rates else 0:.0f}/s e2e_p50={r['e2e_latency_ms']['p50']}ms "
      f"e2e_p99={r['e2e_latency_ms']['p99']}ms lost={r['samples_lost']} dup={r['samples_duplicated']} "
      f"stored={r['samples_stored']}/{r['samples_sent']}")
for s in a.get("steps", []):
    print("      ", s)
PY
    done
done
python3 - "$out" "$repeats" <<'PY'
import json, statistics, sys
out, repeats = sys.argv[1], int(sys.argv[2])
med = {}
for v in ("fixed", "auto"):
    runs = [json.load(open(f"{out}/{v}-r{r}.json")) for r in range(1, repeats + 1)]
    for q in ("p50", "p99"):
        xs = [x["e2e_latency_ms"][q] for x in runs]
        med[(v, q)] = statistics.median(xs)
        print(f"{v:5} e2e {q}: median {med[(v, q)]:.0f} ms, spread {min(xs)}..{max(xs)} ms")
for q in ("p50", "p99"):
    print(f"auto/fixed e2e {q} median ratio: {med[('auto', q)] / med[('fixed', q)]:.2f}")
PY
