#!/usr/bin/env bash
# Full-size runs of the heavy tests, and the figures quoted in release notes.
# Not part of CI: it takes much longer than scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export FLEETLINE_SIZE=full
# Property tests: many more cases than the CI default of 256.
export PROPTEST_CASES="${PROPTEST_CASES:-5000}"
scripts/test.sh
echo "==> gateway figures at full size (crash, outage, budgets, bad input, write errors)"
cargo test --locked -p fleetline-gateway --test gateway -- --nocapture --test-threads 1 2>&1 \
    | grep -oE '(crash test|outage test|drop-oldest|write errors|bad input|units back|descriptors before).*' || true
echo "==> wire size and encode cost"
cargo run --locked --release -p fleetline-device --example wire_size
echo "==> gateway throughput against a Mosquitto bridge"
scripts/bench-gateway.sh
echo "==> a depot: 3,000 / 8,000 / 15,000 units on one gateway, the connect storm, 15,000 at night"
scripts/bench-depot.sh
echo "==> cloud figures at full size (SIGKILLs and crashes inside commits, external broker + S3)"
cargo test --locked -p fleetline-cloud --test it e2e:: -- --nocapture --test-threads 1 2>&1 \
    | grep -oE '(cloud crash test|external broker|TLS \+ bad input).*' || true
echo "==> cloud ingest against writing the same rows straight to Parquet (one core)"
cargo run --locked --release -p fleetline-cloud --example bench-cloud
echo "==> the demo at its default size (1,000 vehicles, 60 s)"
cargo run --locked --release -p fleetline-sim -- demo --report-json target/demo-report.json > /dev/null
python3 -c "import json; r = json.load(open('target/demo-report.json')); print({k: r[k] for k in ('vehicles', 'samples_sent', 'samples_acked', 'samples_stored', 'samples_lost', 'samples_duplicated', 'throughput_samples_per_s', 'e2e_latency_ms', 'ingest_latency_ms')})"
python3 -c "import json; r = json.load(open('target/demo-report.json')); print('events', json.dumps(r['events']))"
echo "==> late data: a two-hour backlog gives the same aggregates and events"
cargo test --locked -p fleetline-sim --test it late_data:: -- --nocapture 2>&1 | grep -E 'identical|test result' || true
echo "==> event scores on a seed the thresholds were not tuned on (300 vehicles, 20 simulated minutes)"
cargo run --locked --release -p fleetline-sim -- demo --vehicles 300 --time-scale 10 --duration 120s --seed 2027 \
    --report-json target/demo-events.json > /dev/null
python3 -c "import json; r = json.load(open('target/demo-events.json')); print({k: r[k] for k in ('samples_stored', 'samples_lost', 'samples_duplicated')}); print('events', json.dumps(r['events']))"
echo "==> the unit firmware on a host: four gateway kills and four power cuts, readings stored once"
cargo test --locked -p fleetline-unit-host --test unit the_units -- --nocapture 2>&1 | grep -E 'unit through|test result' || true
echo "==> the unit firmware on a Cortex-M4 (QEMU): flash, RAM, stack, the gateway run and the watchdog reset"
scripts/firmware-check.sh 2>/dev/null | tail -1
