#!/usr/bin/env bash
# Stop what cluster/start_local.sh started (the state folder is kept for inspection).
set -uo pipefail
STATE=${1:-${TMPDIR:-/tmp}/bnew-cluster}
BIN=$(dirname "$(command -v python)")
[ -f "$STATE/mlflow.pid" ] && pkill -TERM -P "$(cat "$STATE/mlflow.pid")" 2>/dev/null
[ -f "$STATE/mlflow.pid" ] && kill "$(cat "$STATE/mlflow.pid")" 2>/dev/null
RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE/ray_auth_token" "$BIN/ray" stop --force >/dev/null 2>&1
[ -f "$STATE/ray_tmpdir" ] && rm -rf "$(cat "$STATE/ray_tmpdir")"
[ -f "$STATE/postgres/pid" ] && su postgres -c "$(cat "$STATE/postgres/bin")/pg_ctl -D $STATE/postgres/data stop -m fast" >/dev/null 2>&1
exit 0
