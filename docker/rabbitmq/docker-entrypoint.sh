#!/bin/sh
# Entrypoint of the orderflow RabbitMQ image: starts the server in the
# foreground as the `rabbitmq` user (not through Debian's wrapper, which sends
# the logs to files), so `docker logs` shows them.
set -eu
if [ "${1:-}" = rabbitmq-server ]; then
  shift
  mkdir -p /var/lib/rabbitmq /var/log/rabbitmq
  chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq
  if [ -n "${RABBITMQ_ERLANG_COOKIE:-}" ]; then
    printf '%s' "$RABBITMQ_ERLANG_COOKIE" > /var/lib/rabbitmq/.erlang.cookie
    chown rabbitmq:rabbitmq /var/lib/rabbitmq/.erlang.cookie
    chmod 400 /var/lib/rabbitmq/.erlang.cookie
  fi
  cd /var/lib/rabbitmq
  exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups \
    /usr/lib/rabbitmq/bin/rabbitmq-server "$@"
fi
exec "$@"
