#!/usr/bin/env bash
# A real multi-process cluster on loopback: an MLflow tracking server with basic auth that also
# serves artifacts, a Ray head with the dashboard / Jobs API, and WORKERS Ray worker nodes, all
# with Ray's token authentication. Everything binds to 127.0.0.1.
#
#   cluster/start_local.sh [STATE_DIR]
#     env: WORKERS=2 CPUS_PER_NODE=1 HEAD_CPUS=0 RAY_PORT=6390 DASHBOARD_PORT=8265 RAY_CLIENT_PORT=10001
#          MLFLOW_PORT=5055 MLFLOW_BACKEND=sqlite|postgres (PG_PORT) MLFLOW_ADMIN_USER=admin
#          MLFLOW_ADMIN_PASSWORD (default: generated, kept in STATE_DIR/mlflow_admin_password)
#          BNEW_DATA_DIR, BNEW_STORAGE_PATH (passed on to every node)
#   eval "$(cluster/start_local.sh /tmp/bnew-cluster)"   # exports the addresses, Ray's auth token path and MLflow's credentials
#   bnew sweep submit demo                               # the sweep's driver runs as a Ray job on that cluster
#   bnew sweep run demo                                  # or: the driver runs here, trials on the cluster
#   cluster/stop_local.sh /tmp/bnew-cluster
#
# On real machines the same commands run with the machines' addresses: `ray start --head` on one,
# `ray start --address HEAD:6379` on the others, and one `mlflow server` every node can reach.
set -euo pipefail
STATE=${1:-${TMPDIR:-/tmp}/bnew-cluster}
WORKERS=${WORKERS:-2}
CPUS_PER_NODE=${CPUS_PER_NODE:-1}
RAY_PORT=${RAY_PORT:-6390}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
RAY_CLIENT_PORT=${RAY_CLIENT_PORT:-10001}
MLFLOW_PORT=${MLFLOW_PORT:-5055}
BIN=$(dirname "$(command -v python)")
mkdir -p "$STATE/artifacts"
secret() { (umask 077 && "$BIN/python" -c "import secrets; print(secrets.token_hex(32))" >"$1"); }

# MLflow: metadata in SQLite (or PostgreSQL), artifacts uploaded through the server, so no
# worker ever writes to a path of its own. MLflow's basic-auth app: every request needs a user; a
# good login is remembered for 5 minutes (cluster/mlflow_basic_auth.ini says why).
if [ "${MLFLOW_BACKEND:-sqlite}" = postgres ]; then
    BACKEND=$("$(dirname "$0")/postgres_local.sh" "$STATE/postgres") \
        || { echo "postgresql did not start (user postgres needs access to $STATE); see $STATE/postgres/*.log" >&2; exit 1; }
else
    BACKEND="sqlite:///$STATE/mlflow.db"
fi
export MLFLOW_TRACKING_USERNAME=${MLFLOW_ADMIN_USER:-admin}
[ -n "${MLFLOW_ADMIN_PASSWORD:-}" ] && (umask 077 && echo "$MLFLOW_ADMIN_PASSWORD" >"$STATE/mlflow_admin_password")
[ -f "$STATE/mlflow_admin_password" ] || secret "$STATE/mlflow_admin_password"
export MLFLOW_TRACKING_PASSWORD=$(cat "$STATE/mlflow_admin_password")
echo "$MLFLOW_TRACKING_USERNAME" >"$STATE/mlflow_admin_user"
[ -f "$STATE/mlflow_secret_key" ] || secret "$STATE/mlflow_secret_key"
cat >"$STATE/basic_auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = sqlite:///$STATE/basic_auth.db
admin_username = $MLFLOW_TRACKING_USERNAME
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = 300
EOF
MLFLOW_AUTH_CONFIG_PATH="$STATE/basic_auth.ini" MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_TRACKING_PASSWORD" \
MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat "$STATE/mlflow_secret_key") \
    nohup "$BIN/mlflow" server --app-name basic-auth --host 127.0.0.1 --port "$MLFLOW_PORT" \
    --backend-store-uri "$BACKEND" --serve-artifacts --artifacts-destination "$STATE/artifacts" --workers 1 \
    >"$STATE/mlflow.log" 2>&1 &
echo $! >"$STATE/mlflow.pid"
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT

# Ray: the head holds no CPUs of its own unless asked, so trials land on worker nodes; every node
# starts with MLflow's address and credentials in its environment, so trials and job drivers
# log without being handed secrets. Dashboard agents take free ports (several nodes share a host).
# Ray's socket paths must stay under 107 bytes, so its session folder lives in a short /tmp path.
export RAY_TMPDIR=${RAY_TMPDIR:-$(mktemp -d /tmp/bnew-ray-XXXXXX)}
echo "$RAY_TMPDIR" >"$STATE/ray_tmpdir"
echo "$RAY_PORT" >"$STATE/ray_port"
# Ray's token authentication: every node, driver and Jobs API client presents the same secret token.
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE/ray_auth_token"
[ -f "$RAY_AUTH_TOKEN_PATH" ] || secret "$RAY_AUTH_TOKEN_PATH"
"$BIN/ray" start --head --node-ip-address 127.0.0.1 --port "$RAY_PORT" --num-cpus "${HEAD_CPUS:-0}" \
    --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
    --ray-client-server-port "$RAY_CLIENT_PORT" --dashboard-agent-listen-port 0 \
    --temp-dir "$RAY_TMPDIR" --disable-usage-stats >"$STATE/ray-head.log" 2>&1 \
    || { echo "ray head did not start; see $STATE/ray-head.log" >&2; exit 1; }
# A raylet gets a fixed 30 s to register with the head; on a busy machine a worker may need a retry.
for index in $(seq 1 "$WORKERS"); do
    for attempt in 1 2 3; do
        "$BIN/ray" start --address "127.0.0.1:$RAY_PORT" --node-ip-address 127.0.0.1 --num-cpus "$CPUS_PER_NODE" \
            --dashboard-agent-listen-port 0 --disable-usage-stats >>"$STATE/ray-worker-$index.log" 2>&1 && break
        [ "$attempt" = 3 ] && { echo "ray worker $index did not start; see $STATE/ray-worker-$index.log" >&2; exit 1; }
    done
done

# MLflow starts while Ray does; both must be up before the environment is printed.
for attempt in $(seq 1 121); do
    "$BIN/python" -c "import urllib.request; urllib.request.urlopen('$MLFLOW_TRACKING_URI/health')" 2>/dev/null && break
    if [ "$attempt" = 121 ] || ! kill -0 "$(cat "$STATE/mlflow.pid")" 2>/dev/null; then
        echo "mlflow server did not come up; see $STATE/mlflow.log" >&2
        exit 1
    fi
    sleep 1
done

echo "export RAY_ADDRESS=127.0.0.1:$RAY_PORT"
echo "export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT"
echo "export RAY_AUTH_MODE=token"
echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
echo "export MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI"
echo "export MLFLOW_TRACKING_USERNAME=$MLFLOW_TRACKING_USERNAME"
echo "export MLFLOW_TRACKING_PASSWORD=$MLFLOW_TRACKING_PASSWORD"
