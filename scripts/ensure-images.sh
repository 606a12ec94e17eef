#!/usr/bin/env bash
# Make the images that tests and compose need exist locally, on a laptop (pull) and on CI
# (no registry: build them from Debian packages). Idempotent; run after ensure-docker.sh.
# Writes the Postgres image to use into .jobcell-pg-image.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "[jobcell] $*"; }
die() { echo "[jobcell] ERROR: $*" >&2; exit 1; }
have_image() { docker image inspect "$1" >/dev/null 2>&1; }
# A registry that is unreachable fails fast, one that is slow must not stall CI.
pull() { timeout 60 docker pull -q "$1" >/dev/null 2>&1; }
export DEBIAN_FRONTEND=noninteractive

# Host's Debian mirror URL whose path ends in /$1 (debian or debian-security), if any.
host_mirror() {
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | grep -v '^[[:space:]]*#' | grep -oE "https?://[^ ]+/$1/?( |\$)" | head -n1 | tr -d ' ' | sed 's:/$::' || true
}

rootfs=""
cleanup_rootfs() {
  [[ -n $rootfs ]] || return 0
  # debootstrap mounts proc/sys inside the tree; unmount first, and never let rm cross a mount.
  grep -o " ${rootfs}[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf --one-file-system "$rootfs"
  rootfs=""
}
trap cleanup_rootfs EXIT

build_debian_base() {
  [[ $(id -u) -eq 0 ]] || die "cannot pull debian:bookworm-slim and building it needs root (debootstrap)"
  if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap via apt"
    apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null
  fi
  local mirror security dir
  # The host's own mirror is the one known to be reachable from here.
  mirror=$(host_mirror debian); mirror=${mirror:-http://deb.debian.org/debian}
  security=$(host_mirror debian-security)
  # /var/tmp, not /tmp: the chroot's binaries must be executable (tmpfs /tmp is often noexec).
  rootfs=$(mktemp -d /var/tmp/jobcell-rootfs.XXXXXX); dir=$rootfs
  log "building debian:bookworm-slim with debootstrap from $mirror"
  debootstrap --variant=minbase bookworm "$dir" "$mirror" >/tmp/jobcell-debootstrap.log 2>&1 \
    || { tail -20 /tmp/jobcell-debootstrap.log; die "debootstrap failed (log: /tmp/jobcell-debootstrap.log)"; }
  if [[ -n $security ]]; then  # same update sources as the official image, when the host can reach them
    echo "deb $mirror bookworm-updates main" >>"$dir/etc/apt/sources.list"
    echo "deb $security bookworm-security main" >>"$dir/etc/apt/sources.list"
  fi
  # Builds FROM this image reach PyPI through the same TLS path as the host: they need its extra CAs.
  mkdir -p "$dir/usr/local/share/ca-certificates"
  cp -r /usr/local/share/ca-certificates/. "$dir/usr/local/share/ca-certificates/" 2>/dev/null || true
  rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/var/cache/apt/archives/*.deb
  tar --numeric-owner -C "$dir" -c . \
    | docker import -c 'CMD ["bash"]' -c 'LABEL jobcell.built-by=debootstrap' - debian:bookworm-slim >/dev/null
  cleanup_rootfs
}

t=$SECONDS
if have_image debian:bookworm-slim; then log "debian:bookworm-slim: present"
elif pull debian:bookworm-slim; then log "debian:bookworm-slim: pulled"
else build_debian_base; log "debian:bookworm-slim: built ($((SECONDS - t)) s)"
fi

t=$SECONDS
if have_image postgres:16 || pull postgres:16; then
  pg_image=postgres:16
else
  pg_image=jobcell/postgres:local
  # Always rebuild: the layer cache makes an unchanged rebuild take about a second.
  log "building $pg_image"
  docker build -t "$pg_image" images/postgres-local >/tmp/jobcell-build-pg.log 2>&1 \
    || { tail -30 /tmp/jobcell-build-pg.log; die "postgres image build failed (log: /tmp/jobcell-build-pg.log)"; }
fi
echo "$pg_image" >.jobcell-pg-image
log "postgres image: $pg_image ($((SECONDS - t)) s)"

# Prove the image works the way the tests use it (testcontainers waits by running psql in the container).
t=$SECONDS
py=python3
if ! python3 -c 'import psycopg, testcontainers.core.container' 2>/dev/null; then
  venv=/tmp/jobcell-tc-venv
  [[ -x $venv/bin/python ]] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'testcontainers[postgres]' 'psycopg[binary]' >/tmp/jobcell-tc-pip.log 2>&1 \
    || { tail -20 /tmp/jobcell-tc-pip.log; die "pip install testcontainers failed"; }
  py=$venv/bin/python
fi
TESTCONTAINERS_RYUK_DISABLED=true PG_IMAGE=$pg_image "$py" - <<'PY'
import os, psycopg
try:
    from testcontainers.community.postgres import PostgresContainer  # 4.15: old path is a deprecated shim
except ImportError:
    from testcontainers.postgres import PostgresContainer
with PostgresContainer(os.environ["PG_IMAGE"], driver=None) as pg:
    with psycopg.connect(pg.get_connection_url()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
PY
log "postgres image verified with testcontainers ($((SECONDS - t)) s)"

scripts/build-job-image.sh
