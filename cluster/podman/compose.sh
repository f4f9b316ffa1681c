#!/usr/bin/env bash
# docker-compose.yml with podman-compose, on the images of build_images.sh: the compose files
# docker-compose.yml + docker-compose.cpu.yml + docker-compose.podman.yml, podman set up as
# common.sh says (runc, cgroupfs, ulimits), podman-compose from PyPI.
#   cluster/podman/compose.sh up       # start in the background, then wait until every service is healthy
#   cluster/podman/compose.sh down     # stop and remove the containers; the volumes (MLflow's runs) stay
#   cluster/podman/compose.sh ps       # or logs SERVICE, down -v, ...: any other podman-compose command
# env: BNEW_COMPOSE_ENV_FILE (.env; the secrets, .env.example), BNEW_COMPOSE_PROJECT (the
# compose's `name`, bnew-sweep), BNEW_COMPOSE_WAIT_S (900: how long `up` waits).
# podman 4.3 (Debian 12) neither runs healthchecks on its own (that needs systemd's timers) nor
# lets podman-compose wait for `condition: service_healthy`: services start in dependency order,
# one that fails early restarts (`restart: unless-stopped`), and `up` runs the healthchecks itself.
set -euo pipefail
source "$(dirname "$0")/common.sh"
setup_podman
cd "$REPO"
PROJECT=${BNEW_COMPOSE_PROJECT:-bnew-sweep}
compose=("$PODMAN_COMPOSE" --env-file "${BNEW_COMPOSE_ENV_FILE:-.env}" -p "$PROJECT" --in-pod false
         -f docker-compose.yml -f docker-compose.cpu.yml -f docker-compose.podman.yml)

wait_healthy() {
    local deadline=$((SECONDS + ${BNEW_COMPOSE_WAIT_S:-900})) names name pending
    names=$(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}')
    [ -n "$names" ] || { echo "compose.sh: no containers of project $PROJECT" >&2; return 1; }
    while :; do
        pending=()
        for name in $names; do
            podman healthcheck run "$name" >/dev/null 2>&1 || pending+=("$name")
        done
        [ ${#pending[@]} -eq 0 ] && { echo "compose.sh: healthy: $(echo $names)" >&2; return 0; }
        if [ $SECONDS -ge $deadline ]; then
            for name in "${pending[@]}"; do
                echo "compose.sh: $name is not healthy ($(podman inspect -f '{{.State.Status}}' "$name")); its log:" >&2
                podman logs --tail 30 "$name" >&2 || true
            done
            return 1
        fi
        sleep 5
    done
}

if [ "$*" = up ]; then
    "${compose[@]}" up -d
    wait_healthy
else
    exec "${compose[@]}" "$@"
fi
