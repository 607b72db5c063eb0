#!/usr/bin/env bash
# Builds and runs a #![no_std] #![no_main] binary that uses the device SDK core and
# sealing. The build fails to link if std leaks into the SDK; the run exits non-zero
# if the core misbehaves. Exits 0 only when both pass.
set -euo pipefail
cd "$(dirname "$0")/.."
manifest=device-sdk/no-std-check/Cargo.toml
cargo build --locked --release --manifest-path "$manifest"
target_dir="${CARGO_TARGET_DIR:-device-sdk/no-std-check/target}"
bin="$target_dir/release/fleetline-no-std-check"
# The dependency graph must not contain std-only crates either.
if cargo tree --locked --manifest-path "$manifest" -e normal --prefix none | grep -Eq '^(tokio|rumqttc|std) '; then
    echo "no-std check: a std-only crate is in the device SDK's no_std dependency tree" >&2
    exit 1
fi
"$bin"
echo "no-std check: passed ($(stat -c %s "$bin") bytes)"
