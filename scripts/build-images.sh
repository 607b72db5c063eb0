#!/usr/bin/env bash
# Builds the OCI images (fleetline-cloud, fleetline-gateway, fleetline-sim) with
# buildah from scratch, the same files the Containerfiles under packaging/images
# give, then checks each one without a container runtime: unpacks it with umoci
# and runs its entrypoint under chroot with --version and --check-config.
#
#   scripts/build-images.sh [OUT_DIR]     (default: $CARGO_TARGET_DIR/images)
#
# Writes OUT_DIR/<image>.oci.tar (an OCI archive: `podman load -i`, `skopeo copy
# oci-archive:...`) and prints each image's size and the checks' output. Needs
# buildah, umoci and binutils (apt-get install buildah umoci skopeo binutils); root.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-$PWD/target}"
out="${1:-$target/images}"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
epoch="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}"
revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
storage=(--storage-driver vfs --root "$out/.storage" --runroot "$out/.run")

for tool in buildah umoci skopeo objcopy; do
    command -v "$tool" >/dev/null || { echo "build-images: $tool is needed (apt-get install buildah umoci skopeo binutils)" >&2; exit 2; }
done

echo "==> cargo build --release"
cargo build --release --locked -p fleetline-cloud -p fleetline-gateway -p fleetline-sim --bins
mkdir -p "$out"
# Set after the build: cargo would rebuild crates whose build scripts watch it.
export SOURCE_DATE_EPOCH="$epoch"

image() {
    local bin="$1" ports="$2" title="$3"
    local root="$out/$bin.rootfs"
    packaging/images/stage-rootfs.sh "$target/release/$bin" "$root"
    local ctr
    ctr="$(buildah "${storage[@]}" from --quiet scratch)"
    buildah "${storage[@]}" copy --quiet "$ctr" "$root/" / >/dev/null
    local cfg=(--user 65532:65532 --workingdir /var/lib/fleetline
        --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
        --entrypoint "[\"/usr/local/bin/$bin\"]" --cmd ''
        --label "org.opencontainers.image.title=$title"
        --label "org.opencontainers.image.version=$version"
        --label "org.opencontainers.image.revision=$revision"
        --label "org.opencontainers.image.licenses=Apache-2.0")
    for p in $ports; do cfg+=(--port "$p"); done
    buildah "${storage[@]}" config "${cfg[@]}" "$ctr"
    rm -f "$out/$bin.oci.tar"
    buildah "${storage[@]}" commit --quiet --timestamp "$SOURCE_DATE_EPOCH" --rm "$ctr" \
        "oci-archive:$out/$bin.oci.tar:fleetline/$bin:$version" >/dev/null
    stat -c %s "$root/usr/local/bin/$bin" >"$out/$bin.binary-size"
    rm -rf "$root"
}

check() {
    local bin="$1"
    local dir="$out/$bin.check"
    rm -rf "$dir" && mkdir -p "$dir"
    skopeo copy --quiet "oci-archive:$out/$bin.oci.tar" "oci:$dir/layout:check"
    umoci unpack --image "$dir/layout:check" "$dir/bundle" >/dev/null
    local rootfs="$dir/bundle/rootfs"
    local user entry
    user="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["process"]["user"]["uid"])' "$dir/bundle/config.json")"
    entry="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["process"]["args"][0])' "$dir/bundle/config.json")"
    echo "--- $bin: entrypoint $entry as uid $user; files:"
    (cd "$rootfs" && find . -type f | sort | sed 's/^/    /')
    echo "    \$ chroot --userspec=$user:$user rootfs $entry --version"
    chroot --userspec="$user:$user" "$rootfs" "$entry" --version | sed 's/^/    /'
    if [ "$bin" != fleetline-sim ]; then
        echo "    \$ chroot --userspec=$user:$user rootfs $entry --check-config"
        local cfg
        cfg="$(chroot --userspec="$user:$user" "$rootfs" "$entry" --check-config)"
        printf '%s\n' "$cfg" | head -4 | sed 's/^/    /'
        echo "    ... ($(printf '%s\n' "$cfg" | wc -l) lines)"
    else
        echo "    \$ chroot --userspec=$user:$user rootfs $entry --help"
        local help
        help="$(chroot --userspec="$user:$user" "$rootfs" "$entry" --help)"
        printf '%s\n' "$help" | head -3 | sed 's/^/    /'
    fi
    rm -rf "$dir"
}

image fleetline-cloud "9580 1884" "Fleetline cloud node"
image fleetline-gateway "1883 8883 9480" "Fleetline edge gateway"
image fleetline-sim "" "Fleetline fleet simulator"

echo "==> images ($out)"
for bin in fleetline-cloud fleetline-gateway fleetline-sim; do
    printf '%-20s %8s MiB (archive), binary %s MiB\n' "$bin" \
        "$(awk "BEGIN{printf \"%.1f\", $(stat -c %s "$out/$bin.oci.tar")/1048576}")" \
        "$(awk "BEGIN{printf \"%.1f\", $(cat "$out/$bin.binary-size")/1048576}")"
done
echo "==> checks (umoci unpack + chroot)"
for bin in fleetline-cloud fleetline-gateway fleetline-sim; do check "$bin"; done
rm -rf "$out/.storage" "$out/.run"
