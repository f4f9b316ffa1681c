#!/usr/bin/env bash
# Stop what cluster/start_local.sh started (the state folder is kept for inspection). Only this
# cluster's processes are stopped: those naming its Ray temp folder, and their descendants
# (`ray stop` would stop every Ray instance of this user on the machine).
set -uo pipefail
STATE=${1:-${TMPDIR:-/tmp}/bnew-cluster}

descendants() {  # PIDs below $1, deepest last
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$child"
        descendants "$child"
    done
}

[ -f "$STATE/mlflow.pid" ] && pkill -TERM -P "$(cat "$STATE/mlflow.pid")" 2>/dev/null
[ -f "$STATE/mlflow.pid" ] && kill "$(cat "$STATE/mlflow.pid")" 2>/dev/null
if [ -f "$STATE/ray_tmpdir" ]; then
    RAY_TMPDIR=$(cat "$STATE/ray_tmpdir")
    # Ray's client server names the head's port, not the temp folder.
    port=$(cat "$STATE/ray_port" 2>/dev/null || echo none)
    roots=$( (pgrep -f -- "$RAY_TMPDIR"; pgrep -f -- "--address=[^ ]*:$port( |$)") || true)
    pids=$(for pid in $roots; do echo "$pid"; descendants "$pid"; done | sort -u)
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null
    rm -rf "$RAY_TMPDIR"
fi
[ -f "$STATE/postgres/pid" ] && kill -INT "$(cat "$STATE/postgres/pid")" 2>/dev/null  # PostgreSQL's fast shutdown
exit 0
