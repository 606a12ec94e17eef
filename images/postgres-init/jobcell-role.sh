#!/bin/bash
# compose.yaml's Postgres entrypoint: the image's own entrypoint, plus the role the dispatcher uses.
#
# The dispatcher connects as `jobcell`, a role that owns the jobcell database and nothing else: no superuser,
# no CREATEROLE, no CREATEDB, no replication, no RLS bypass. So whoever holds the dispatcher's database URL
# cannot read server files, run programs (COPY ... FROM PROGRAM), create roles or touch other databases.
# The superuser (POSTGRES_USER) is used only here, over the local socket.
#
# Runs on every start and is idempotent (the password follows JOBCELL_PG_PASSWORD). It works with the official
# image and with images/postgres-local (which has no /docker-entrypoint-initdb.d), hence a wrapper and not an
# init script. The healthcheck waits for /tmp/jobcell-role-ready, so the dispatcher starts only once the role
# exists. Passwords travel on stdin, never in a command line.
set -uo pipefail

ready=/tmp/jobcell-role-ready
rm -f "$ready"

docker-entrypoint.sh "$@" &
server=$!
# PID 1 ignores signals it has no handler for: pass the stop signal on (the images stop with SIGINT: fast).
trap 'kill -INT "$server" 2>/dev/null' INT TERM

# TCP readiness: the official image's first-start server listens on the socket only, then restarts.
until pg_isready -q -h 127.0.0.1 -U "${POSTGRES_USER:-postgres}"; do
  kill -0 "$server" 2>/dev/null || { wait "$server"; exit $?; }
  sleep 0.5
done

pw=${JOBCELL_PG_PASSWORD:?set JOBCELL_PG_PASSWORD, the password of the jobcell role}
pw=${pw//\'/\'\'}  # as an SQL literal
if psql -q -v ON_ERROR_STOP=1 -h /var/run/postgresql -U "${POSTGRES_USER:-postgres}" -d postgres <<SQL
SELECT 'CREATE ROLE jobcell LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'jobcell') \gexec
ALTER ROLE jobcell WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD '$pw';
SELECT 'CREATE DATABASE jobcell OWNER jobcell'
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'jobcell') \gexec
ALTER DATABASE jobcell OWNER TO jobcell;
REVOKE ALL ON DATABASE jobcell FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE jobcell TO jobcell;
SQL
then
  touch "$ready"
  echo "jobcell postgres: role jobcell (no superuser) owns database jobcell"
else
  # A data volume from before this file made `jobcell` its bootstrap superuser, which cannot be demoted:
  # recreate the volume (`docker compose down -v`) or move the data to a new one by hand.
  echo "jobcell postgres: could not set up role jobcell; the dispatcher will not start (see above)" >&2
fi

status=0
while kill -0 "$server" 2>/dev/null; do wait "$server"; status=$?; done  # a trapped signal ends a wait early
exit "$status"
