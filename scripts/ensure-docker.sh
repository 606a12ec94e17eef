#!/usr/bin/env bash
# Make a working Docker engine (and a compose tool) available.
# Works on three kinds of machine: a laptop with Docker already running (no-op),
# this project's CI machine (root, apt reachable, no dockerd: install + start it),
# and anything else (fail with a message that says what to do).
set -euo pipefail

log() { echo "[jobcell] $*"; }
die() { echo "[jobcell] ERROR: $*" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
# needrestart (pulled in by docker.io's recommends) would otherwise try to restart services after installs.
export NEEDRESTART_SUSPEND=1
can_apt() { [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; }
apt_updated=""
apt_install() {
  # One `apt-get update` per run: a fresh machine has empty lists.
  if [[ -z $apt_updated ]]; then apt-get update -qq; apt_updated=1; fi
  apt-get install -y -qq "$@" >/dev/null
}

docker_ok() { docker info >/dev/null 2>&1; }
# dockerd lives in /usr/sbin, which a non-login shell's PATH may lack.
PATH=$PATH:/usr/sbin:/sbin

if docker_ok; then
  log "docker engine: already running"
else
  if ! command -v dockerd >/dev/null; then
    can_apt || die "no Docker engine: install Docker and start it (or run this script as root on Debian)"
    log "installing docker.io via apt"
    # With recommends (apparmor, cgroupfs-mount): that is the install measured to work on CI.
    apt_install docker.io
  fi
  command -v docker >/dev/null || die "docker CLI missing after install"
  start_dockerd() {
    [[ $(id -u) -eq 0 ]] || die "dockerd is not running and only root can start it: start Docker (e.g. 'sudo systemctl start docker')"
    log "starting dockerd with live-restore (log: /tmp/jobcell-dockerd.log)"
    # live-restore: running job containers survive an engine restart, and the dispatcher re-attaches.
    # (a flag the daemon.json also sets is refused by dockerd, so only when it does not)
    flags=()
    grep -qs '"live-restore"' /etc/docker/daemon.json || flags+=(--live-restore)
    # setsid+nohup: the daemon must outlive this script and the CI step's process group.
    setsid nohup dockerd "${flags[@]}" >/tmp/jobcell-dockerd.log 2>&1 </dev/null &
  }
  # A dockerd that is still starting must not get a twin fighting over its pidfile; one that is still shutting
  # down (an engine restart) is waited out, then a new one is started.
  pgrep -x dockerd >/dev/null || start_dockerd
  for _ in $(seq 60); do
    docker_ok && break
    sleep 1
    pgrep -x dockerd >/dev/null || start_dockerd
  done
  docker_ok || die "dockerd did not become ready within 60 s; see /tmp/jobcell-dockerd.log"
  log "docker engine: ready"
fi

live_restore() { [[ $(docker info -f '{{.LiveRestoreEnabled}}' 2>/dev/null) == true ]]; }
if ! live_restore && [[ $(id -u) -eq 0 ]] && pgrep -x dockerd >/dev/null && ! grep -qs '"live-restore"' /etc/docker/daemon.json; then
  # An engine of this machine's: live-restore is one of the settings dockerd reloads on SIGHUP.
  log "enabling live-restore in /etc/docker/daemon.json (reloaded, no restart)"
  mkdir -p /etc/docker
  python3 - <<'PY'
import json, pathlib
p = pathlib.Path("/etc/docker/daemon.json")
conf = json.loads(p.read_text() or "{}") if p.exists() else {}
conf["live-restore"] = True
p.write_text(json.dumps(conf, indent=2) + "\n")
PY
  pkill -HUP -x dockerd
  for _ in $(seq 10); do live_restore && break; sleep 0.5; done
fi
if ! live_restore; then
  log "WARNING: this Docker engine runs without live-restore: an engine restart kills running jobs (they are"
  log "  retried as lost). Enable it: {\"live-restore\": true} in /etc/docker/daemon.json, then reload dockerd."
fi

# compose runs compose.yaml (and its test); a failed install is reported here and fails that test later.
if docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null; then
  :
elif can_apt; then
  log "installing docker-compose via apt"
  apt_install docker-compose || log "WARNING: docker-compose install failed; tests/test_compose.py will fail"
else
  log "WARNING: neither 'docker compose' nor 'docker-compose' found; install one to use compose.yaml"
fi
