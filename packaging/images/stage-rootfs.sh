#!/usr/bin/env bash
# Lays out the root filesystem of a Fleetline image: the release binary (symbols
# stripped; panics still name their source line), exactly the shared libraries it loads, CA certificates, and
# a non-root user (65532). Used by scripts/build-images.sh (buildah, from
# scratch) and by the Containerfiles' build stage, so both give the same files.
#
#   stage-rootfs.sh BINARY ROOTFS
set -euo pipefail
bin="$1"
root="$2"
name="$(basename "$bin")"

rm -rf "$root"
mkdir -p "$root"/{usr/local/bin,etc/ssl/certs,tmp,var/lib/fleetline}
chmod 1777 "$root/tmp"

objcopy --strip-all "$bin" "$root/usr/local/bin/$name"
chmod 0755 "$root/usr/local/bin/$name"

# The dynamic loader and every library the binary needs, at the paths it looks for them.
ldd "$bin" | awk '/=> \// {print $3} /^[ \t]*\/[^ ]+ \(/ {print $1}' | sort -u | while read -r lib; do
    real="$(readlink -f "$lib")"
    mkdir -p "$root$(dirname "$lib")"
    cp "$real" "$root$lib"
    chmod 0755 "$root$lib"
done
# /lib64 and /lib are symlinks into /usr on merged-/usr systems; keep the same layout.
for l in lib lib64; do
    if [ -L "/$l" ] && [ ! -e "$root/$l" ]; then
        ln -s "$(readlink "/$l")" "$root/$l"
    fi
done

cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/:/sbin/nologin\nfleetline:x:65532:65532:fleetline:/var/lib/fleetline:/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nfleetline:x:65532:\n' >"$root/etc/group"
printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
chown -R 65532:65532 "$root/var/lib/fleetline" 2>/dev/null || true

# One mtime for every file: the same inputs give the same layer.
find "$root" -exec touch -h -d "@${SOURCE_DATE_EPOCH:-0}" {} +
