#!/usr/bin/env bash
# A PostgreSQL server for MLflow's metadata on 127.0.0.1 (Debian's postgresql package), in
# DIR; prints the SQLAlchemy URI. Needs `apt-get install postgresql` and `pip install psycopg2-binary`.
set -euo pipefail
DIR=$1
PG_PORT=${PG_PORT:-5433}
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
mkdir -p "$DIR"
chown postgres "$DIR"
if [ ! -f "$DIR/data/PG_VERSION" ]; then
    su postgres -c "$PG_BIN/initdb -D $DIR/data -A trust -U postgres" >"$DIR/initdb.log" 2>&1
fi
su postgres -c "$PG_BIN/pg_ctl -D $DIR/data -l $DIR/server.log -o '-c listen_addresses=127.0.0.1 -p $PG_PORT -k $DIR' -w start" >/dev/null
echo "$PG_BIN" >"$DIR/bin"
head -n 1 "$DIR/data/postmaster.pid" >"$DIR/pid"
su postgres -c "$PG_BIN/psql -h 127.0.0.1 -p $PG_PORT -tAc \"SELECT 1 FROM pg_database WHERE datname='mlflow'\"" | grep -q 1 \
    || su postgres -c "$PG_BIN/createdb -h 127.0.0.1 -p $PG_PORT mlflow"
echo "postgresql://postgres@127.0.0.1:$PG_PORT/mlflow"
