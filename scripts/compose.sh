#!/usr/bin/env bash
# Run Docker Compose, whichever kind this machine has: the `docker compose` plugin (v2) when it works,
# else the standalone `docker-compose` (1.29 on Debian bookworm).  The arguments are passed on as they
# are; the project's docker-compose.yml is used unless COMPOSE_FILE or -f says otherwise.
#
# usage: scripts/compose.sh [COMPOSE-ARGS...]     e.g. scripts/compose.sh up --build
#
# When the arguments ask compose to build (`build`, `--build`), the wheelhouse build/wheels the
# Dockerfile installs from is prepared first (scripts/docker-build.sh --wheels-only), so that
# `scripts/compose.sh up --build` works on a fresh checkout.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export COMPOSE_FILE=${COMPOSE_FILE:-$ROOT/docker-compose.yml}

if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
else
  echo "compose.sh: error: neither 'docker compose' (the Compose plugin) nor 'docker-compose' is installed" >&2
  exit 127
fi

for arg in "$@"; do
  if [ "$arg" = build ] || [ "$arg" = --build ]; then
    "$ROOT/scripts/docker-build.sh" --wheels-only
    break
  fi
done

exec "${compose[@]}" "$@"
