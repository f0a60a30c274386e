#!/usr/bin/env bash
# Runs a command beside a throwaway Redis and Postgres 15 on private loopback ports.
#
#   scripts/with-services.sh CMD [ARGS...]
#
# Installs redis-server / postgresql-15 with apt when missing, starts both (Postgres
# as the `postgres` user: it refuses root), creates the Supabase roles and applies
# the migrations, exports REDIS_URL and DATABASE_URL (plus the handles the fault
# tests use to stop and start the servers), runs CMD, and stops everything however
# CMD ends: success, failure or Ctrl-C. Exits with CMD's exit code.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}

log() { echo "services: $*" >&2; }

ensure_packages() {
  local missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  [ -x "$PG_BIN/postgres" ] || missing+=(postgresql-15)
  ((${#missing[@]} == 0)) && return 0
  if [ "$(id -u)" != 0 ]; then
    log "missing ${missing[*]}; install them (apt-get install ${missing[*]}) or run as root"
    exit 1
  fi
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

workdir=""
redis_pid=""
redis_port=""
pg_started=""

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

cleanup() {
  set +e
  if [ -n "$redis_pid" ]; then
    # The fault tests may have restarted Redis on the same port under another PID.
    redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1
    kill "$redis_pid" 2>/dev/null
    for _ in $(seq 40); do kill -0 "$redis_pid" 2>/dev/null || break; sleep 0.05; done
  fi
  if [ -n "$pg_started" ]; then
    as_pg "$PG_BIN/pg_ctl" -D "$workdir/pg/data" -m immediate stop >/dev/null 2>&1
  fi
  [ -n "$workdir" ] && rm -rf "$workdir"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ensure_packages

workdir=$(mktemp -d /tmp/sonos-services.XXXXXX)
chmod 755 "$workdir"

# --- Redis -----------------------------------------------------------------
redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$workdir" --logfile "$workdir/redis.log" &
redis_pid=$!
# Not a job of this shell: the fault tests kill it on purpose, which bash would report.
disown "$redis_pid"
for _ in $(seq 100); do
  redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break
  sleep 0.05
done
redis-cli -p "$redis_port" ping >/dev/null || { log "redis did not start"; cat "$workdir/redis.log" >&2; exit 1; }

# --- Postgres --------------------------------------------------------------
pg_port=$(free_port)
mkdir -p "$workdir/pg"
[ "$(id -u)" = 0 ] && chown postgres: "$workdir/pg"
as_pg "$PG_BIN/initdb" -D "$workdir/pg/data" -U postgres --auth=trust --no-sync \
  -E UTF8 --locale=C >"$workdir/initdb.log" 2>&1 || { cat "$workdir/initdb.log" >&2; exit 1; }
as_pg "$PG_BIN/pg_ctl" -D "$workdir/pg/data" -l "$workdir/pg/server.log" -w -t 30 \
  -o "-p $pg_port -k $workdir/pg -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
  start >/dev/null || { cat "$workdir/pg/server.log" >&2; exit 1; }
pg_started=1

psql_admin() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$pg_port" -U postgres "$@"; }
psql_admin -d postgres -c 'create database sonos' >/dev/null
psql_admin -d sonos -f "$root/tests/sql/supabase_roles.sql" >/dev/null
for migration in "$root"/supabase/migrations/*.sql; do
  psql_admin -d sonos -f "$migration" >/dev/null
done

export REDIS_URL="redis://127.0.0.1:$redis_port/0"
export DATABASE_URL="postgresql://postgres@127.0.0.1:$pg_port/sonos"
# Handles for tests that stop and restart the servers (fault injection).
export TEST_SERVICES_DIR="$workdir"
export TEST_REDIS_PORT="$redis_port" TEST_REDIS_PID="$redis_pid"
export TEST_PG_PORT="$pg_port" TEST_PG_DATA="$workdir/pg/data" TEST_PG_BIN="$PG_BIN"
log "redis on 127.0.0.1:$redis_port, postgres on 127.0.0.1:$pg_port"

# From here the command decides what Ctrl-C means (it gets the signal too): a server that
# stops cleanly exits 0, pytest reports an interruption as a failure.
trap : INT TERM
set +e
"$@"
rc=$?
set -e
exit "$rc"
