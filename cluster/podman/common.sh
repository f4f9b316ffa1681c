# Sourced by the scripts of cluster/podman/: what podman needs on a host without a Docker engine
# (Debian's podman as root, runc, cgroupfs), kept out of the system's own configuration.
#   REPO   the repository root            CACHE  .cache/podman (git and the build context ignore it)
#   PODMAN_COMPOSE  podman-compose from PyPI, in a venv of its own under CACHE
# shellcheck shell=bash
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE=${BNEW_PODMAN_CACHE:-$REPO/.cache/podman}
PODMAN_COMPOSE_VERSION=1.6.0
mkdir -p "$CACHE"

# Debian's packages: podman with runc (crun fails on hosts with hybrid cgroups), netavark and
# aardvark-dns (the compose network and its service names; netavark NATs with iptables),
# debootstrap (the base images).
ensure_packages() {
    local missing=() pkg
    for pkg in podman runc netavark aardvark-dns iptables debootstrap python3-venv; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ]; then
        echo "cluster/podman: install ${missing[*]} (as root: apt-get install ${missing[*]})" >&2
        return 1
    fi
    echo "cluster/podman: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# containers.conf for every podman call of these scripts (CONTAINERS_CONF): runc, cgroupfs, no
# systemd, and explicit ulimits: podman's defaults (nofile and nproc at 1048576 for root) make
# runc fail here with "error setting rlimits for ready process: error setting rlimit type 7
# (nofile) / 6 (nproc): operation not permitted". 16384 (or the host's hard limit if lower) is
# what such a host allows (nproc failed above 32768 on a host whose hard limit was 96365);
# BNEW_PODMAN_NOFILE / BNEW_PODMAN_NPROC override. nproc counts every process and thread of a
# uid across all containers (no user namespace): Ray's nodes and MLflow all run as uid 1000.
write_containers_conf() {
    local nofile nproc
    nofile=$(ulimit -Hn); [ "$nofile" = unlimited ] || [ "$nofile" -gt 16384 ] && nofile=16384
    nproc=$(ulimit -Hu); [ "$nproc" = unlimited ] || [ "$nproc" -gt 16384 ] && nproc=16384
    nofile=${BNEW_PODMAN_NOFILE:-$nofile} nproc=${BNEW_PODMAN_NPROC:-$nproc}
    cat >"$CACHE/containers.conf" <<CONF
# Written by cluster/podman/common.sh; used through CONTAINERS_CONF by cluster/podman/*.sh.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
    export CONTAINERS_CONF=$CACHE/containers.conf
    # `podman build` (buildah) ignores default_ulimits for its RUN steps: the same, as flags.
    ULIMITS=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
}

# podman-compose from PyPI: Debian 12's 1.0.3 reads neither `!reset` (docker-compose.cpu.yml) nor
# the Compose spec's newer keys.
ensure_podman_compose() {
    PODMAN_COMPOSE=$CACHE/venv/bin/podman-compose
    if ! "$PODMAN_COMPOSE" --version 2>/dev/null | grep -q "$PODMAN_COMPOSE_VERSION"; then
        /usr/bin/python3 -m venv "$CACHE/venv"
        "$CACHE/venv/bin/pip" install --quiet "podman-compose==$PODMAN_COMPOSE_VERSION"
    fi
}

setup_podman() {
    ensure_packages
    write_containers_conf
    ensure_podman_compose
}

# The Debian archive (and its security archive) this machine's apt uses: debootstrap and the image's
# apt then go through whatever mirror or proxy the machine is set up with, and the repo names no host.
# One-line (sources.list, *.list) and deb822 (*.sources) entries; a suite ending in -security is
# the security archive, one that is a Debian release's codename (or -updates) the main one.
# APT_ETC: another apt configuration folder than /etc/apt.
apt_archive() {  # apt_archive main|security
    local etc=${APT_ETC:-/etc/apt}
    python3 - "$1" "$etc/sources.list" "$etc"/sources.list.d/*.list "$etc"/sources.list.d/*.sources <<'PYTHON'
import re, sys
from pathlib import Path
RELEASES = {"buster", "bullseye", "bookworm", "trixie", "forky", "sid", "stable", "testing", "unstable"}
wanted, entries = sys.argv[1], []
for path in map(Path, sys.argv[2:]):
    if not path.is_file():
        continue
    text = path.read_text()
    if path.suffix == ".sources":
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", stanza, re.M))
            if "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes") != "no":
                entries += [(uri, suite) for uri in fields.get("URIs", "").split() for suite in fields.get("Suites", "").split()]
    else:
        for line in text.splitlines():
            match = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
            if match:
                entries.append(match.groups())
for uri, suite in entries:
    release, _, pocket = suite.partition("-")
    if release in RELEASES and (pocket == "security" if wanted == "security" else pocket in ("", "updates")):
        print(uri.rstrip("/"))
        break
else:
    sys.exit(f"build_images: no Debian {wanted} archive in this machine's apt sources; set "
             f"{'DEBIAN_SECURITY_MIRROR' if wanted == 'security' else 'DEBIAN_MIRROR'} to one")
PYTHON
}
