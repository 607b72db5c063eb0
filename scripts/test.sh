#!/usr/bin/env bash
# The project's test command: installs what the tests need when it is missing,
# then runs formatting, lints, every test and the no_std proof. `.ci/run` calls it.
#
# Sizes of the heavy end-to-end tests come from the environment (FLEETLINE_SIZE=ci
# by default; scripts/soak.sh sets FLEETLINE_SIZE=full).
set -euo pipefail
cd "$(dirname "$0")/.."
export FLEETLINE_SIZE="${FLEETLINE_SIZE:-ci}"

step() { printf '\n==> %s\n' "$*"; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# --- System packages: real MQTT peers for the tests.
need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
# Node.js: validates the charts' KEDA objects against KEDA's CRD schema.
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
# systemd-analyze: checks the gateway's systemd unit.
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
# libfaketime: a gateway restarted with its clock stepped back.
ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || need_apt+=(libfaketime)
if [ "${#need_apt[@]}" -gt 0 ]; then
    step "installing ${need_apt[*]}"
    as_root apt-get update -qq
    # The package's service is not needed: tests start their own brokers on free ports.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
export PATH="$PATH:/usr/sbin"

# --- Python packages for tests that read our outputs with real tools (pyarrow,
# DuckDB, onnxruntime, moto), in an ignored venv; reinstalled when the list changes.
req=tests/requirements.txt
if [ -f "$req" ] && grep -q '^[A-Za-z]' "$req"; then
    if [ ! -x .venv/bin/python ]; then
        step "creating .venv"
        python3 -m venv .venv
    fi
    if [ ! -f .venv/.installed ] || ! cmp -s "$req" .venv/.installed; then
        step "installing Python test packages"
        .venv/bin/python -m pip install -q --disable-pip-version-check -r "$req"
        cp "$req" .venv/.installed
    fi
    export PATH="$PWD/.venv/bin:$PATH"
fi

step "cargo fmt --check"
cargo fmt --all -- --check
cargo fmt --all --manifest-path device-sdk/no-std-check/Cargo.toml -- --check
cargo fmt --all --manifest-path firmware-examples/Cargo.toml -- --check

step "clippy (all targets, std) and the no_std library build"
cargo clippy --locked --workspace --all-targets --all-features -- -D warnings
cargo clippy --locked --workspace --lib -- -D warnings

step "docs (warnings denied)"
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps --workspace --all-features

step "tests"
cargo test --locked --workspace --all-features

step "charts: Helm lint and render, Kubernetes and KEDA schemas, RBAC, the pods' configuration, the broker ACL"
if ! cmp -s charts/tests/package-lock.json charts/tests/node_modules/.installed-lock.json 2>/dev/null; then
    npm ci --prefix charts/tests --no-audit --no-fund --loglevel=error
    cp charts/tests/package-lock.json charts/tests/node_modules/.installed-lock.json
fi
cargo build --locked -q -p fleetline-cloud -p fleetline-gateway --bins
python3 charts/tests/check_charts.py --bin-dir "${CARGO_TARGET_DIR:-target}/debug"

step "models: ONNX files against their cards, onnxruntime on the held-out seed, tract against onnxruntime, retrained bit for bit"
cargo build --locked -q -p fleetline-inference --example score
python3 models/check_models.py --tract "${CARGO_TARGET_DIR:-target}/debug/examples/score"

step "no_std proof"
scripts/no-std-check.sh

step "firmware: the unit built for Cortex-M4 (flash, RAM and stack against the budget), its self-test in QEMU, a run against the gateway through an AT modem across a watchdog reset and a gateway kill"
set +e
scripts/firmware-check.sh
firmware=$?
set -e
if [ "$firmware" = 3 ]; then
    echo "firmware: NOT CHECKED — the Debian packages it builds with could not be had (see above)" >&2
elif [ "$firmware" != 0 ]; then
    exit "$firmware"
fi

step "all checks passed"
