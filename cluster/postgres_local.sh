#!/usr/bin/env bash
# A PostgreSQL server for MLflow's metadata on 127.0.0.1 (Debian's postgresql package), started
# from root; prints the SQLAlchemy URI. Needs `apt-get install postgresql` and `pip install
# psycopg2-binary`.
#
#   cluster/postgres_local.sh DIR        (env: PG_PORT=5433)
#
# PostgreSQL refuses to run as root, so it runs as the `postgres` user, in a folder of its own
# under /tmp (DIR may sit below folders that user cannot enter, such as a `mktemp -d`); DIR
# records that folder (`root`), the server's pid (`pid`) and its log. Stop it with
# `kill -INT $(cat DIR/pid)` (PostgreSQL's fast shutdown), as cluster/stop_local.sh does.
set -euo pipefail
DIR=$(realpath -m "$1")
PG_PORT=${PG_PORT:-5433}
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
mkdir -p "$DIR"
cd /  # the postgres user may not read the caller's working directory
if [ ! -f "$DIR/root" ]; then
    ROOT=$(mktemp -d /tmp/bnew-pg-XXXXXX)
    chown postgres: "$ROOT"
    echo "$ROOT" >"$DIR/root"
fi
ROOT=$(cat "$DIR/root")
as_postgres() { su postgres -s /bin/sh -c "$1"; }
if [ ! -f "$ROOT/data/PG_VERSION" ]; then
    as_postgres "$PG_BIN/initdb -D $ROOT/data -A trust -U postgres" >"$DIR/initdb.log" 2>&1 \
        || { echo "initdb failed; see $DIR/initdb.log" >&2; exit 1; }
fi
if ! as_postgres "$PG_BIN/pg_ctl -D $ROOT/data status" >/dev/null 2>&1; then
    as_postgres "$PG_BIN/pg_ctl -D $ROOT/data -l $ROOT/server.log -w -t 120 \
        -o '-c listen_addresses=127.0.0.1 -p $PG_PORT -k $ROOT' start" >/dev/null \
        || { echo "postgresql did not start; see $ROOT/server.log" >&2; exit 1; }
fi
head -n 1 "$ROOT/data/postmaster.pid" >"$DIR/pid"
ln -sfn "$ROOT/server.log" "$DIR/server.log"
as_postgres "$PG_BIN/psql -h 127.0.0.1 -p $PG_PORT -U postgres -tAc \"SELECT 1 FROM pg_database WHERE datname='mlflow'\"" | grep -q 1 \
    || as_postgres "$PG_BIN/createdb -h 127.0.0.1 -p $PG_PORT -U postgres mlflow"
echo "postgresql+psycopg2://postgres@127.0.0.1:$PG_PORT/mlflow"  # psycopg2-binary; SQLAlchemy 2.1 defaults to psycopg 3
