#!/usr/bin/env bash
# Builds the unit firmware (firmware-examples/) for a Cortex-M4 and runs its
# self-test in QEMU (Arm MPS2 AN386) twice — two power-ups sharing the unit's
# flash image — then prints one JSON line: flash and static RAM of the release
# build, the SDK's device state, the self-test's result, the boot epochs of the
# two power-ups (the second must be larger).
#
# rustup here has no thumb targets and cannot fetch them. Debian's rustc-web
# packages can: they are downloaded by name (apt-get download) and unpacked into
# a cache directory, never installed; with RUSTC_BOOTSTRAP=1 and cargo's
# -Zbuild-std=core that compiler builds `core` for thumbv7em-none-eabihf from its
# own sources, and rustup's rust-lld links. QEMU comes from Debian's
# qemu-system-arm (installed when missing, as scripts/test.sh installs peers).
#
# Exit: 0 passed; 1 failed (build, self-test or budget); 3 the packages could not
# be had (no package mirror): said on stderr and in the JSON line.
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned: these move with Debian's security updates; when a pin is gone from the
# mirror the candidate of the same package is used and the JSON line says which.
RUSTC_VERSION="1.96.0+dfsg1-1~deb12u2"
LLVM_VERSION="1:22.1.8-1~deb12u1"
PACKAGES=(rustc-web rust-web-src libstd-rust-web-1.96 libstd-rust-web-dev)
# Budget: flash and static RAM of the release build (the device state lives on
# the stack and is reported apart).
FLASH_BUDGET=$((128 * 1024))
RAM_BUDGET=$((32 * 1024))

cache="${FLEETLINE_TOOLCHAIN_CACHE:-$HOME/.cache/fleetline/toolchain}"
root="$cache/rustc-web-root"
export PATH="$PATH:/usr/sbin"

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

unavailable() {
    echo "firmware check: $1" >&2
    printf '{"firmware":"unavailable","reason":"%s"}\n' "$1"
    exit 3
}

fetch() {
    # One package: the pinned version, else the mirror's candidate.
    local name="$1" pin="$2"
    (cd "$cache/debs" && apt-get download -q "$name=$pin" >/dev/null 2>&1) && { echo "$pin"; return 0; }
    (cd "$cache/debs" && apt-get download -q "$name" >/dev/null 2>&1) || return 1
    apt-cache policy "$name" | awk '/Candidate:/ {print $2}'
}

if [ ! -x "$root/usr/bin/rustc" ]; then
    mkdir -p "$cache/debs"
    rm -f "$cache/debs"/*.deb
    [ -n "$(find /var/lib/apt/lists -name '*Packages*' -print -quit 2>/dev/null)" ] || as_root apt-get update -qq || true
    used=""
    for p in "${PACKAGES[@]}"; do
        v=$(fetch "$p" "$RUSTC_VERSION") || unavailable "cannot download $p from the package mirror"
        used="$used $p=$v"
    done
    v=$(fetch libllvm22 "$LLVM_VERSION") || unavailable "cannot download libllvm22 from the package mirror"
    used="$used libllvm22=$v"
    rm -rf "$root.tmp"
    mkdir -p "$root.tmp"
    for d in "$cache/debs"/*.deb; do dpkg -x "$d" "$root.tmp"; done
    echo "$used" > "$root.tmp/PACKAGES"
    rm -rf "$root"
    mv "$root.tmp" "$root"
fi
if ! command -v qemu-system-arm >/dev/null 2>&1; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-arm >/dev/null \
        || unavailable "cannot install qemu-system-arm"
fi

export LD_LIBRARY_PATH="$root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export RUSTC="$root/usr/bin/rustc"
# core is built from the compiler's own sources, which needs unstable flags.
export RUSTC_BOOTSTRAP=1
# rustup's toolchain ships rust-lld, the linker thumb targets name.
host_bin="$(rustup run "$(rustup show active-toolchain | cut -d' ' -f1)" rustc --print sysroot)/lib/rustlib/x86_64-unknown-linux-gnu/bin"
export PATH="$PATH:$host_bin"
export CARGO_TARGET_DIR="${FIRMWARE_TARGET_DIR:-$HOME/.cache/fleetline/firmware-target}"
"$RUSTC" --version >&2

# From its directory: its .cargo/config.toml sets the target and the linker script.
(cd firmware-examples && cargo build --locked --release -Zbuild-std=core)
elf="$CARGO_TARGET_DIR/thumbv7em-none-eabihf/release/fleetline-unit"

# Flash: what is loaded from it (vectors, code, constants, .data's initial values).
# RAM: .data, .bss and .uninit (the stack and the device state on it come on top).
read -r flash ram < <(size -A "$elf" | awk '
    $1 == ".vector_table" || $1 == ".text" || $1 == ".rodata" || $1 == ".data" { flash += $2 }
    $1 == ".data" || $1 == ".bss" || $1 == ".uninit" { ram += $2 }
    END { print flash + 0, ram + 0 }')

# Two power-ups: QEMU runs in a scratch directory where the unit keeps its flash
# image (semihosting); the second run must boot with a larger epoch.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
result=passed
epochs=""
for run in 1 2; do
    set +e
    (cd "$scratch" && timeout 60 qemu-system-arm -cpu cortex-m4 -machine mps2-an386 -nographic \
        -semihosting-config enable=on,target=native -kernel "$elf") >"$scratch/log" 2>&1
    qemu=$?
    set -e
    cat "$scratch/log" >&2
    if [ "$qemu" != 0 ] || ! grep -q '^self-test: passed$' "$scratch/log"; then result=failed; fi
    epochs="$epochs $(sed -n 's/^self-test: power-up .*: boot epoch \([0-9]*\)$/\1/p' "$scratch/log")"
    state=$(sed -n 's/^self-test: device state \([0-9]*\) bytes$/\1/p' "$scratch/log")
done
read -r first second <<<"$epochs"
if [ -z "${first:-}" ] || [ -z "${second:-}" ] || [ "$second" -le "$first" ]; then result=failed; fi
within=true
if [ "$flash" -gt "$FLASH_BUDGET" ] || [ "$ram" -gt "$RAM_BUDGET" ]; then within=false; fi
printf '{"firmware":"thumbv7em-none-eabihf","machine":"mps2-an386","flash_bytes":%s,"flash_budget":%s,"static_ram_bytes":%s,"ram_budget":%s,"device_state_bytes":%s,"self_test":"%s","boot_epochs":[%s],"within_budget":%s,"packages":"%s"}\n' \
    "$flash" "$FLASH_BUDGET" "$ram" "$RAM_BUDGET" "${state:-null}" "$result" "${first:-null},${second:-null}" "$within" "$(xargs < "$root/PACKAGES")"
[ "$result" = passed ] && [ "$within" = true ]
