#!/usr/bin/env bash
# A real multi-process cluster on loopback: a Ray head, WORKERS Ray worker nodes and an MLflow
# tracking server that also serves artifacts. Everything binds to 127.0.0.1.
#
#   cluster/start_local.sh [STATE_DIR]        (env: WORKERS=1 CPUS_PER_NODE=1 RAY_PORT=6390 MLFLOW_PORT=5055
#                                              MLFLOW_BACKEND=sqlite|postgres)
#   eval "$(cluster/start_local.sh /tmp/bnew-cluster)"   # exports RAY_ADDRESS, Ray's auth token and MLFLOW_TRACKING_URI
#   bnew sweep run demo                                  # runs on that cluster, logs through the server
#   cluster/stop_local.sh /tmp/bnew-cluster
#
# On real machines the same commands run with the machines' addresses: `ray start --head` on one,
# `ray start --address HEAD:6379` on the others, and one `mlflow server` every node can reach.
set -euo pipefail
STATE=${1:-${TMPDIR:-/tmp}/bnew-cluster}
WORKERS=${WORKERS:-1}
CPUS_PER_NODE=${CPUS_PER_NODE:-1}
RAY_PORT=${RAY_PORT:-6390}
MLFLOW_PORT=${MLFLOW_PORT:-5055}
BIN=$(dirname "$(command -v python)")
mkdir -p "$STATE/artifacts"

# Ray: the head holds no CPUs of its own unless asked, so trials land on worker processes.
# Ray's socket paths must stay under 107 bytes, so its session folder lives in a short /tmp path.
export RAY_TMPDIR=${RAY_TMPDIR:-$(mktemp -d /tmp/bnew-ray-XXXXXX)}
echo "$RAY_TMPDIR" >"$STATE/ray_tmpdir"
echo "$RAY_PORT" >"$STATE/ray_port"
# Ray's token authentication: every node and driver presents the same secret token.
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE/ray_auth_token"
[ -f "$RAY_AUTH_TOKEN_PATH" ] || (umask 077 && "$BIN/python" -c "import secrets; print(secrets.token_hex(32))" >"$RAY_AUTH_TOKEN_PATH")
"$BIN/ray" start --head --node-ip-address 127.0.0.1 --port "$RAY_PORT" --num-cpus "${HEAD_CPUS:-0}" \
    --include-dashboard false --temp-dir "$RAY_TMPDIR" --disable-usage-stats >"$STATE/ray-head.log" 2>&1 \
    || { echo "ray head did not start; see $STATE/ray-head.log" >&2; exit 1; }
for index in $(seq 1 "$WORKERS"); do
    "$BIN/ray" start --address "127.0.0.1:$RAY_PORT" --node-ip-address 127.0.0.1 --num-cpus "$CPUS_PER_NODE" \
        --disable-usage-stats >"$STATE/ray-worker-$index.log" 2>&1
done

# MLflow: metadata in SQLite (or PostgreSQL), artifacts uploaded through the server, so no
# worker ever writes to a path of its own.
if [ "${MLFLOW_BACKEND:-sqlite}" = postgres ]; then
    BACKEND=$("$(dirname "$0")/postgres_local.sh" "$STATE/postgres")
else
    BACKEND="sqlite:///$STATE/mlflow.db"
fi
nohup "$BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --backend-store-uri "$BACKEND" \
    --serve-artifacts --artifacts-destination "$STATE/artifacts" --workers 1 >"$STATE/mlflow.log" 2>&1 &
echo $! >"$STATE/mlflow.pid"
for _ in $(seq 1 120); do
    if "$BIN/python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$MLFLOW_PORT/health')" 2>/dev/null; then
        echo "export RAY_ADDRESS=127.0.0.1:$RAY_PORT"
        echo "export RAY_AUTH_MODE=token"
        echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
        echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT"
        exit 0
    fi
    sleep 1
done
echo "mlflow server did not come up; see $STATE/mlflow.log" >&2
exit 1
