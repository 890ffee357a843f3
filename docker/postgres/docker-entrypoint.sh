#!/bin/bash
# Entrypoint of the orderflow PostgreSQL image (docker/postgres/Dockerfile):
# the official image's behaviour that orderflow's compose file relies on, in
# a page. On first start (empty PGDATA) it runs initdb with POSTGRES_USER /
# POSTGRES_PASSWORD, listens on every address (password auth for TCP),
# creates POSTGRES_DB and runs /docker-entrypoint-initdb.d/*; then it runs
# `postgres` as the postgres user, in the foreground.
set -euo pipefail

if [ $# -eq 0 ]; then
  set -- postgres
fi
if [ "${1:0:1}" = '-' ]; then
  set -- postgres "$@"
fi
if [ "$1" != postgres ]; then
  exec "$@"
fi

if [ "$(id -u)" = 0 ]; then
  mkdir -p "$PGDATA"
  chown postgres:postgres "$PGDATA"
  chmod 700 "$PGDATA"
  exec setpriv --reuid=postgres --regid=postgres --init-groups "$BASH_SOURCE" "$@"
fi

user=${POSTGRES_USER:-postgres}
db=${POSTGRES_DB:-$user}
auth=${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "$auth" != trust ]; then
    echo "docker-entrypoint: POSTGRES_PASSWORD is not set (or set POSTGRES_HOST_AUTH_METHOD=trust)" >&2
    exit 1
  fi
  pwfile=$(mktemp)
  printf '%s\n' "${POSTGRES_PASSWORD:-}" > "$pwfile"
  initdb --username="$user" --pwfile="$pwfile" --encoding=UTF8 --locale=C.UTF-8 \
    --auth-local=trust --auth-host="$auth" ${POSTGRES_INITDB_ARGS:-} >/dev/null
  rm -f "$pwfile"
  {
    echo "listen_addresses = '*'"
  } >> "$PGDATA/postgresql.conf"
  printf 'host all all all %s\n' "$auth" >> "$PGDATA/pg_hba.conf"

  # A private server on the socket only, for the one-time setup.
  pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -c unix_socket_directories=/var/run/postgresql" -w start >/dev/null
  psql=(psql -v ON_ERROR_STOP=1 --no-psqlrc -h /var/run/postgresql -U "$user" -d postgres -q)
  if [ "$db" != postgres ]; then
    "${psql[@]}" -c "CREATE DATABASE \"$db\"" >/dev/null
  fi
  for f in /docker-entrypoint-initdb.d/*; do
    case "$f" in
      *.sql) echo "docker-entrypoint: running $f"; "${psql[@]}" -d "$db" -f "$f" ;;
      *.sh)  echo "docker-entrypoint: running $f"; . "$f" ;;
      *) ;;
    esac
  done
  pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
  echo "docker-entrypoint: initialised $PGDATA (user $user, database $db)"
fi

exec "$@"
