#!/usr/bin/env bash
# Build a minimal Debian bookworm image with Python 3.11 from Debian packages (debootstrap), for machines
# that cannot pull public images. The tier Dockerfiles take it as BASE_IMAGE; elsewhere they use python:3.11-slim.
# Usage: deploy/base-image.sh NAME:TAG   (does nothing when that image exists, built from the same packages)
set -euo pipefail
image=${1:-recserve-base:bookworm}
suite=${SUITE:-bookworm}
# python3-venv gives ensurepip for the builder stage; libgomp1 is the OpenMP runtime llama.cpp links to, libnuma1
# the NUMA library vLLM's CPU kernels link to.
packages=python3,python3-venv,ca-certificates,libgomp1,libnuma1
# Kept as a label: an image built from another package list is rebuilt, not reused.
built_from=$(docker image inspect --format '{{index .Config.Labels "io.recserve.packages"}}' "$image" 2>/dev/null || true)
if [[ $built_from == "$packages" ]]; then
    echo "$image exists"
    exit 0
fi
# The mirror apt already uses, so the build goes wherever this machine may fetch Debian packages from.
mirror=${DEBIAN_MIRROR:-}
if [[ -z $mirror ]]; then
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
fi
if [[ -z $mirror ]]; then
    mirror=$(awk '$1 == "deb" && $2 !~ /^\[/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
fi
mirror=${mirror:-http://deb.debian.org/debian}
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include="$packages" \
    "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log"; rm -f "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"
# Leave nothing of the build machine behind: package lists and caches are refetched by whoever needs them.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
printf 'deb http://deb.debian.org/debian %s main\n' "$suite" >"$rootfs/etc/apt/sources.list"
tar -C "$rootfs" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' --change "LABEL io.recserve.packages=$packages" - "$image" >/dev/null
echo "built $image"
