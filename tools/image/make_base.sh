#!/usr/bin/env bash
# Makes the image's base, a minimal Debian bookworm, from Debian's packages alone (no container
# registry needed): debootstrap into a folder, trim it like debian:bookworm-slim, `podman import`.
#   tools/image/make_base.sh [TAG]        (default caption-base:bookworm; needs root, debootstrap, podman)
# Skips the work when the image already exists; FORCE=1 rebuilds it.
set -euo pipefail
tag=${1:-caption-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=${DEBIAN_SUITE:-bookworm}

if [ -z "${FORCE:-}" ] && podman image exists "$tag"; then
    echo "base image $tag exists (FORCE=1 to rebuild)"
    exit 0
fi
for tool in debootstrap podman; do
    command -v "$tool" >/dev/null || { echo "error: $tool is missing (apt-get install -y debootstrap podman)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "error: debootstrap needs root" >&2; exit 1; }

root=$(mktemp -d "${TMPDIR:-/tmp}/caption-base.XXXXXX")
trap 'rm -rf "$root"' EXIT
start=$(date +%s)
# minbase: essential packages and apt, what debian:bookworm-slim holds.
debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$root.log" 2>&1 ||
    { tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
# What the slim images drop: package caches and lists, docs, man pages, locales, logs.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* \
    "$root"/var/log/* "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/tmp/* "$root"/var/tmp/*
find "$root"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
printf 'Types: deb\nURIs: %s\nSuites: %s %s-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$mirror" "$suite" "$suite" >"$root/etc/apt/sources.list.d/debian.sources"
rm -f "$root/etc/apt/sources.list"
# The build's hostname and resolver must not leak into the image.
: >"$root/etc/resolv.conf"
echo localhost >"$root/etc/hostname"
tar --numeric-owner -C "$root" -c . |
    podman import --quiet --change 'CMD ["bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        - "$tag" >/dev/null
echo "base image $tag made in $(( $(date +%s) - start )) s ($(podman image inspect --format '{{.Size}}' "$tag" | numfmt --to=iec))"
