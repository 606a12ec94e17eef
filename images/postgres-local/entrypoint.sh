#!/bin/bash
# Minimal re-implementation of the official postgres image's entrypoint contract:
# first start -> initdb with POSTGRES_USER as superuser and POSTGRES_PASSWORD, create POSTGRES_DB,
# then run postgres in the foreground as the postgres user, listening on all addresses.
set -euo pipefail

# `docker run IMAGE -c fsync=off` passes server flags, as with the official image.
if [[ ${1:-} == -* ]]; then set -- postgres "$@"; fi
[[ ${1:-} == postgres ]] || exec "$@"

user=${POSTGRES_USER:-postgres}
db=${POSTGRES_DB:-$user}
auth=${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}
if [[ $auth != trust && -z ${POSTGRES_PASSWORD:-} ]]; then
  echo "error: POSTGRES_PASSWORD is not set (or set POSTGRES_HOST_AUTH_METHOD=trust)" >&2
  exit 1
fi

as_pg=()
if [[ $(id -u) -eq 0 ]]; then
  mkdir -p "$PGDATA" /var/run/postgresql
  chown postgres:postgres "$PGDATA" /var/run/postgresql
  chmod 700 "$PGDATA"
  # setpriv execs in place (no lingering parent), so postgres stays PID 1 and gets the stop signal.
  as_pg=(setpriv --reuid=postgres --regid=postgres --init-groups)
fi

if [[ ! -s $PGDATA/PG_VERSION ]]; then
  pwfile=$(mktemp)
  printf '%s\n' "${POSTGRES_PASSWORD:-}" >"$pwfile"
  [[ ${#as_pg[@]} -eq 0 ]] || chown postgres "$pwfile"
  pwopt=(); [[ -z ${POSTGRES_PASSWORD:-} ]] || pwopt=(--pwfile="$pwfile")
  "${as_pg[@]}" initdb -D "$PGDATA" --username="$user" "${pwopt[@]}" \
    --auth-local=trust --auth-host="$auth" --encoding=UTF8 --locale=C.UTF-8 >/dev/null
  rm -f "$pwfile"
  echo "host all all all $auth" >>"$PGDATA/pg_hba.conf"
  echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
  # Single-user mode instead of a temporary server: nothing listens (or logs "ready") before the real start.
  if [[ $db != postgres ]]; then
    echo "CREATE DATABASE \"${db//\"/\"\"}\" OWNER \"${user//\"/\"\"}\"" \
      | "${as_pg[@]}" postgres --single -D "$PGDATA" postgres >/dev/null
  fi
  echo "jobcell postgres-local: initialized $PGDATA (user $user, db $db)"
fi

exec "${as_pg[@]}" "$@"
