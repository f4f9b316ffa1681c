#!/usr/bin/env bash
# The images of docker-compose.yml without Docker Hub, from Debian's packages and PyPI (or wheels
# already on this machine), with podman (Debian's, as root):
#   localhost/bnew-debian:bookworm        debootstrap's minbase of Debian 12, `podman import`ed
#   localhost/bnew-base:py311-bookworm    + Python 3.11 in a venv of user `ray` (base.Containerfile)
#   localhost/bnew-postgres:15-bookworm   + PostgreSQL 15 (postgres.Containerfile)
#   localhost/bnew-sweep:VERSION-rayRAY   cluster/Dockerfile with BASE_IMAGE=localhost/bnew-base:...
# Installs what it needs first (Debian's podman, runc, debootstrap; podman-compose from PyPI in
# .cache/podman/venv). Kept in .cache/podman, which git and the build context ignore: the
# debootstrap tarball and the wheels the image installs (`pip download` here, with this machine's
# pip configuration, then mounted into the build: nothing is fetched inside a container but
# Debian's packages). A second run rebuilds only what changed (podman's layer cache).
#   cluster/podman/build_images.sh          env: DEBIAN_MIRROR, DEBIAN_SECURITY_MIRROR (default: the
#                                           archives this machine's own apt sources name)
set -euo pipefail
source "$(dirname "$0")/common.sh"
MIRROR=${DEBIAN_MIRROR:-$(apt_archive main)}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-$(apt_archive security)}
setup_podman
cd "$REPO"
RAY_VERSION=$(sed -n 's/^ARG RAY_VERSION=//p' cluster/Dockerfile)
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE=localhost/bnew-sweep:$VERSION-ray$RAY_VERSION
log() { echo "[build_images $(date +%T)] $*" >&2; }
has_image() { podman image exists "$1"; }
# podman build TAG ARGS...: a rebuild leaves the image it replaces untagged (7 GB for bnew-sweep
# when its dependencies change): removed with its intermediate layers, the new one's stay cached.
build() {
    local tag=$1 old new
    shift
    old=$(podman image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)
    log "podman build -> $tag"
    podman build "${ULIMITS[@]}" -t "$tag" "$@"
    new=$(podman image inspect -f '{{.Id}}' "$tag")
    if [ -n "$old" ] && [ "$old" != "$new" ]; then podman rmi "$old" >/dev/null 2>&1 || true; fi
}

# 1. Debian 12 from its packages.
if [ ! -s "$CACHE/debian-bookworm.tar" ]; then
    log "debootstrap bookworm ($MIRROR)"
    rm -rf "$CACHE/rootfs"
    debootstrap --variant=minbase --include=ca-certificates bookworm "$CACHE/rootfs" "$MIRROR" >"$CACHE/debootstrap.log"
    cat >"$CACHE/rootfs/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY_MIRROR bookworm-security main
SOURCES
    # No service starts while a package installs (there is no init in a build).
    printf '#!/bin/sh\nexit 101\n' >"$CACHE/rootfs/usr/sbin/policy-rc.d" && chmod 755 "$CACHE/rootfs/usr/sbin/policy-rc.d"
    echo 'APT::Install-Recommends "false";' >"$CACHE/rootfs/etc/apt/apt.conf.d/90no-recommends"
    rm -rf "$CACHE/rootfs"/var/cache/apt/archives/*.deb "$CACHE/rootfs"/var/lib/apt/lists/*
    tar --numeric-owner -C "$CACHE/rootfs" -cf "$CACHE/debian-bookworm.tar.tmp" .
    mv "$CACHE/debian-bookworm.tar.tmp" "$CACHE/debian-bookworm.tar"
    rm -rf "$CACHE/rootfs"
    podman rmi -f localhost/bnew-debian:bookworm >/dev/null 2>&1 || true
fi
if ! has_image localhost/bnew-debian:bookworm; then
    log "podman import -> localhost/bnew-debian:bookworm"
    podman import --change 'CMD ["/bin/bash"]' "$CACHE/debian-bookworm.tar" localhost/bnew-debian:bookworm >/dev/null
fi

# 2. Python 3.11 as Ray's image has it, and PostgreSQL.
build localhost/bnew-base:py311-bookworm -f cluster/podman/base.Containerfile cluster/podman
build localhost/bnew-postgres:15-bookworm -f cluster/podman/postgres.Containerfile cluster/podman

# 3. The wheels of the image: the project's dependencies (pyproject.toml: dependencies + the
# `cluster` extra), the Ray of the Dockerfile, setuptools to build the package. Downloaded again
# only when that list changes.
PY=$CACHE/venv/bin/python
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || { echo "build_images: /usr/bin/python3 must be Python 3.11, the image's (Debian 12)" >&2; exit 1; }
REQUIREMENTS=$("$PY" - "$RAY_VERSION" <<'PYTHON'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["cluster"]
                + [f"ray[default,tune]=={sys.argv[1]}", "setuptools>=68"]))
PYTHON
)
mkdir -p "$CACHE/wheels"
if [ "$(cat "$CACHE/wheels/.requirements" 2>/dev/null)" != "$REQUIREMENTS" ]; then
    log "pip download -> $CACHE/wheels"
    echo "$REQUIREMENTS" >"$CACHE/requirements.txt"
    "$CACHE/venv/bin/pip" download --quiet --only-binary=:all: -d "$CACHE/wheels" -r "$CACHE/requirements.txt"
    echo "$REQUIREMENTS" >"$CACHE/wheels/.requirements"
fi

# 4. The cluster image, on the local base, installing from those wheels only.
build "$IMAGE" -f cluster/Dockerfile --build-arg BASE_IMAGE=localhost/bnew-base:py311-bookworm \
    --build-arg WHEELS=/wheels --volume "$CACHE/wheels:/wheels:ro" .
log "done: localhost/bnew-postgres:15-bookworm $IMAGE"
