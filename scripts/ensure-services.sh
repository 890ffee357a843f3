#!/usr/bin/env bash
# Makes sure RabbitMQ and PostgreSQL are installed and running on this machine,
# as the tests and `orderflow up` expect them (127.0.0.1:5672 guest/guest,
# 127.0.0.1:5432 user postgres). Installs them from the distribution's packages
# when missing, starts them when stopped. Idempotent; prints what it did.
#
# Source it (`. scripts/ensure-services.sh`) to also get
# ORDERFLOW_TEST_DATABASE_URL exported when PostgreSQL needs a password.
set -euo pipefail

log() { printf 'ensure-services: %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 what=$2
  for _ in $(seq 1 120); do
    port_open "$port" && return 0
    sleep 1
  done
  log "$what did not open port $port within 120 s"
  return 1
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then
    as_root apt-get update -qq
    apt_updated=1
  fi
  log "installing $* from the distribution's packages"
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

# --- RabbitMQ ---------------------------------------------------------------
if ! command -v rabbitmqctl >/dev/null 2>&1; then
  apt_install rabbitmq-server
fi
if ! port_open 5672; then
  log "starting RabbitMQ"
  as_root rabbitmq-server -detached || true
  wait_port 5672 RabbitMQ
  as_root rabbitmqctl -q await_startup >/dev/null 2>&1 || true
fi
# Quorum queues need their feature flag; a fresh install has it, an upgraded one may not.
as_root rabbitmqctl -q enable_feature_flag quorum_queue >/dev/null 2>&1 || true

# --- PostgreSQL -------------------------------------------------------------
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  apt_install postgresql
fi
if ! port_open 5432; then
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  if [ -z "$version" ]; then
    log "no PostgreSQL cluster found; creating one"
    version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
    as_root pg_createcluster "$version" main
  fi
  log "starting PostgreSQL $version"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_port 5432 PostgreSQL
fi

# The tests connect over TCP as `postgres`. With trust authentication (this
# project's machines) no password is needed; a stock Debian cluster wants one,
# so give the postgres role a local development password and say so.
if command -v psql >/dev/null 2>&1 && ! psql -h 127.0.0.1 -U postgres -w -d postgres -Atc 'select 1' >/dev/null 2>&1; then
  log "PostgreSQL asks for a password over TCP; setting the development password 'postgres' for role postgres"
  as_root su postgres -c "psql -q -c \"ALTER ROLE postgres PASSWORD 'postgres'\"" >/dev/null
  export ORDERFLOW_TEST_DATABASE_URL=${ORDERFLOW_TEST_DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}
  export ORDERFLOW_DATABASE_URL=${ORDERFLOW_DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/orderflow}
fi

# The tests run four at a time, each test's system with its own pools: more
# than PostgreSQL's default of 100 connections. Raised once (a restart).
want_connections=400
admin_url=${ORDERFLOW_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
have_connections=$(psql "$admin_url" -w -Atc 'show max_connections' 2>/dev/null || echo "$want_connections")
if [ "$have_connections" -lt "$want_connections" ]; then
  if psql "$admin_url" -w -qc "ALTER SYSTEM SET max_connections = $want_connections"; then
    log "raising PostgreSQL's max_connections from $have_connections to $want_connections for the tests (restarting it)"
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main restart
    wait_port 5432 PostgreSQL
  else
    log "could not raise PostgreSQL's max_connections ($have_connections): tests running four at a time may be refused connections"
  fi
fi

log "RabbitMQ on 127.0.0.1:5672 and PostgreSQL on 127.0.0.1:5432 are up"
