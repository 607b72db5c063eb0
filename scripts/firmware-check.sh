#!/usr/bin/env bash
# Builds the unit firmware (firmware-examples/) for a Cortex-M4 and runs it in
# QEMU (Arm MPS2 AN386): the self-test twice — two power-ups sharing the unit's
# flash image — then the unit's firmware against the real gateway (UART0 a
# socket to the gateway's device port) until three batches are acked. Prints
# one JSON line: flash, static RAM and peak stack of the unit's release build
# against the budget, the device state, the self-test's result, the boot epochs
# of the two power-ups (the second must be larger), the gateway run's result.
#
# The gateway binary comes from the host build (`cargo build -p
# fleetline-gateway`, which scripts/test.sh does first; FLEETLINE_GATEWAY_BIN
# names another); without one the gateway run is skipped and says so.
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
# Budget: flash, and static RAM plus the peak stack the firmware measured, of
# the unit's release build.
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
# The host build's target directory (the gateway binary), before it is replaced.
host_target="${CARGO_TARGET_DIR:-$PWD/target}"
export CARGO_TARGET_DIR="${FIRMWARE_TARGET_DIR:-$HOME/.cache/fleetline/firmware-target}"
"$RUSTC" --version >&2

# From its directory: its .cargo/config.toml sets the target and the linker script.
(cd firmware-examples && cargo build --locked --release -Zbuild-std=core)
elf="$CARGO_TARGET_DIR/thumbv7em-none-eabihf/release/fleetline-unit"
selftest_elf="$CARGO_TARGET_DIR/thumbv7em-none-eabihf/release/self-test"

# Flash: what is loaded from it (vectors, code, constants, .data's initial values).
# RAM: .data, .bss and .uninit; the stack comes on top, measured by the firmware.
sizes() {
    size -A "$1" | awk '
        $1 == ".vector_table" || $1 == ".text" || $1 == ".rodata" || $1 == ".data" { flash += $2 }
        $1 == ".data" || $1 == ".bss" || $1 == ".uninit" { ram += $2 }
        END { print flash + 0, ram + 0 }'
}
read -r flash ram < <(sizes "$elf")
read -r selftest_flash selftest_ram < <(sizes "$selftest_elf")

pick_port() {
    # Below the kernel's ephemeral range: still free when the gateway binds it again.
    python3 - <<'PY'
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
for _ in range(500):
    p = random.randrange(10000, low)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
    except OSError:
        continue
    finally:
        s.close()
    print(p)
    break
PY
}

qemu() {
    # qemu ELF [extra QEMU arguments...]: runs in $scratch, output in $scratch/log.
    local image="$1"
    shift
    set +e
    (cd "$scratch" && timeout 120 qemu-system-arm -cpu cortex-m4 -machine mps2-an386 -nographic -monitor none \
        -semihosting-config enable=on,target=native "$@" -kernel "$image") >"$scratch/log" 2>&1
    local rc=$?
    set -e
    cat "$scratch/log" >&2
    return $rc
}

# Two power-ups of the self-test: QEMU runs in a scratch directory where the
# unit keeps its flash image (semihosting); the second must boot with a larger epoch.
scratch=$(mktemp -d)
gateway_pid=""
modem_pid=""
cleanup() {
    if [ -n "$gateway_pid" ]; then kill "$gateway_pid" 2>/dev/null || true; fi
    if [ -n "$modem_pid" ]; then kill "$modem_pid" 2>/dev/null || true; fi
    rm -rf "$scratch"
}
trap cleanup EXIT
result=passed
epochs=""
for run in 1 2; do
    qemu "$selftest_elf" || result=failed
    grep -q '^self-test: passed$' "$scratch/log" || result=failed
    epochs="$epochs $(sed -n 's/^self-test: power-up .*: boot epoch \([0-9]*\)$/\1/p' "$scratch/log")"
    state=$(sed -n 's/^self-test: device state \([0-9]*\) bytes$/\1/p' "$scratch/log")
done
read -r first second <<<"$epochs"
if [ -z "${first:-}" ] || [ -z "${second:-}" ] || [ "$second" -le "$first" ]; then result=failed; fi

# The unit's firmware against the real gateway: UART0 is a socket character
# device to scripts/at-modem.py, a cellular modem's AT socket interface that
# opens the TCP connection to the gateway's device port for the unit. Three
# seconds in, its loop stops turning (once); the board's watchdog must reset
# it, and the next boot must take a larger epoch from flash. Once that boot
# has an ack, the gateway is killed (-9) and restarted two seconds later: the
# unit must see the socket close, redial through the modem, and reach six
# batches acked (durable at the gateway) within the time bound.
gateway_bin="${FLEETLINE_GATEWAY_BIN:-$host_target/debug/fleetline-gateway}"
gateway_run=skipped
watchdog=skipped
acked=null
stack=null
unit_state=null
if [ -x "$gateway_bin" ]; then
    gateway_run=failed
    port=$(pick_port)
    {
        echo 'format = 1'
        echo '[[gateways]]'
        echo 'id = "gw-fw"'
        echo "key = \"$(printf '11%.0s' $(seq 32))\""
        echo '[[devices]]'
        echo 'fleet = "demo"'
        echo 'id = "v-00001"'
        echo "key = \"$(printf '07%.0s' $(seq 32))\""
    } >"$scratch/provisioning.toml"
    {
        echo 'id = "gw-fw"'
        echo "data_dir = \"$scratch/gateway-data\""
        echo "provisioning = \"$scratch/provisioning.toml\""
        echo '[devices]'
        echo "listen = \"127.0.0.1:$port\""
        echo '[uplink]'
        echo 'host = "127.0.0.1"'
        echo 'port = 9'
        echo '[http]'
        echo 'listen = "127.0.0.1:0"'
    } >"$scratch/gateway.toml"
    start_gateway() {
        "$gateway_bin" --config "$scratch/gateway.toml" >"$scratch/gateway.out" 2>>"$scratch/gateway.log" &
        gateway_pid=$!
        for _ in $(seq 100); do grep -q listening "$scratch/gateway.out" 2>/dev/null && break; sleep 0.1; done
    }
    start_gateway
    modem_port=$(pick_port)
    python3 scripts/at-modem.py --listen "$modem_port" --log "$scratch/modem.log" >"$scratch/modem.out" 2>&1 &
    modem_pid=$!
    for _ in $(seq 100); do grep -q listening "$scratch/modem.out" 2>/dev/null && break; sleep 0.1; done
    # Six acks in the boot after the reset, across a gateway kill.
    echo "acks=6 seconds=90 hang-after-ms=3000 gateway=127.0.0.1:$port" >"$scratch/fleetline-unit-run.cfg"
    (cd "$scratch" && timeout 150 qemu-system-arm -cpu cortex-m4 -machine mps2-an386 -nographic -monitor none \
        -semihosting-config enable=on,target=native \
        -chardev "socket,id=modem,host=127.0.0.1,port=$modem_port,reconnect=1" -serial chardev:modem \
        -kernel "$elf") >"$scratch/log" 2>&1 &
    qemu_pid=$!
    # Once the rebooted unit has an ack, the gateway is killed and restarted.
    gateway_killed=no
    for _ in $(seq 900); do
        if [ "$(grep -c '^unit: booted' "$scratch/log")" -ge 2 ] \
            && sed -n '/^unit: hanging/,$p' "$scratch/log" | grep -q '^unit: batch'; then
            kill -9 "$gateway_pid"
            wait "$gateway_pid" 2>/dev/null || true
            sleep 2
            start_gateway
            gateway_killed=yes
            break
        fi
        kill -0 "$qemu_pid" 2>/dev/null || break
        sleep 0.1
    done
    qemu_rc=0
    wait "$qemu_pid" || qemu_rc=$?
    cat "$scratch/log" >&2
    if [ "$qemu_rc" = 0 ] && grep -q '^unit: passed$' "$scratch/log" && [ "$gateway_killed" = yes ] \
        && sed -n '/^unit: hanging/,$p' "$scratch/log" | grep -q '^unit: disconnected (Closed)$'; then
        gateway_run="passed: across a gateway kill"
    else
        result=failed
    fi
    boots=$(sed -n 's/^unit: booted, epoch \([0-9]*\),.*/\1/p' "$scratch/log" | xargs)
    read -r boot1 boot2 _ <<<"$boots"
    if grep -q '^unit: hanging' "$scratch/log" && [ -n "${boot2:-}" ] && [ "$boot2" -gt "$boot1" ]; then
        watchdog="reset: epoch $boot1 then $boot2"
    else
        watchdog=failed
        result=failed
    fi
    acked=$(sed -n 's/^unit: \([0-9]*\) batches (\([0-9]*\) readings) acked.*/\2/p' "$scratch/log")
    stack=$(sed -n 's/^unit: .* stack \([0-9]*\) bytes$/\1/p' "$scratch/log")
    unit_state=$(sed -n 's/^unit: booted, epoch [0-9]*, unit state \([0-9]*\) bytes.*/\1/p' "$scratch/log" | head -1)
    kill "$gateway_pid" "$modem_pid" 2>/dev/null || true
    wait "$gateway_pid" "$modem_pid" 2>/dev/null || true
    gateway_pid=""
    modem_pid=""
else
    echo "firmware check: no gateway binary at $gateway_bin; the unit's run against it is skipped" >&2
fi

within=true
if [ "$flash" -gt "$FLASH_BUDGET" ] || [ "$ram" -gt "$RAM_BUDGET" ]; then within=false; fi
if [ -n "$stack" ] && [ "$stack" != null ] && [ $((ram + stack)) -gt "$RAM_BUDGET" ]; then within=false; fi
printf '{"firmware":"thumbv7em-none-eabihf","machine":"mps2-an386","flash_bytes":%s,"flash_budget":%s,"static_ram_bytes":%s,"stack_peak_bytes":%s,"ram_budget":%s,"unit_state_bytes":%s,"device_state_bytes":%s,"self_test":"%s","self_test_flash_bytes":%s,"self_test_static_ram_bytes":%s,"boot_epochs":[%s],"gateway_run":"%s","watchdog":"%s","readings_acked_by_gateway":%s,"within_budget":%s,"packages":"%s"}\n' \
    "$flash" "$FLASH_BUDGET" "$ram" "${stack:-null}" "$RAM_BUDGET" "${unit_state:-null}" "${state:-null}" "$result" \
    "$selftest_flash" "$selftest_ram" "${first:-null},${second:-null}" "$gateway_run" "$watchdog" "${acked:-null}" "$within" "$(xargs < "$root/PACKAGES")"
[ "$result" = passed ] && [ "$within" = true ]
