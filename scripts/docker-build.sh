#!/usr/bin/env bash
# Build the pagepool-emu image, with or without a container registry (docs/docker.md).
#
# usage: scripts/docker-build.sh [--offline | --wheels-only] [DOCKER-BUILD-OPTIONS...]
#   --offline       do not try to pull the official Python image; use the local debootstrap base image
#   --wheels-only   only prepare the wheelhouse (scripts/compose.sh does this before a compose build)
#   other options go to `docker build` (e.g. --no-cache)
#
# environment:
#   EMU_IMAGE   image to build (default pagepool-emu:local)
#   BASE_IMAGE  base image to build on (default: python:3.11-slim if it is here or can be pulled,
#               else pagepool-emu-base:bookworm, built by scripts/build-base-image.sh when missing)
#   PYTHON      host interpreter that prepares the wheelhouse (default python3.11: the images run 3.11)
#
# 1. Wheelhouse build/wheels: the project's wheel (rebuilt every time, from a clean copy of the tree)
#    and a wheel of every runtime dependency.  Dependencies are downloaded (host pip, host certificates)
#    only when the wheelhouse cannot satisfy them; afterwards the whole script works offline.
# 2. Base image, as above.
# 3. docker build --network none: the Dockerfile installs from the wheelhouse and needs no network.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE=${EMU_IMAGE:-pagepool-emu:local}
OFFICIAL_BASE=python:3.11-slim
LOCAL_BASE=pagepool-emu-base:bookworm
PYTHON=${PYTHON:-python3.11}
WHEELS=$ROOT/build/wheels
# Wheels of the build backend (pyproject's build-system.requires), so that the project's own wheel
# can be rebuilt with no network too.  Kept apart: the image does not need them.
BUILD_WHEELS=$ROOT/build/wheels-build

say() { printf 'docker-build: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

offline=${EMU_OFFLINE:-0}
wheels_only=0
build_args=()
for arg in "$@"; do
  case $arg in
    --offline) offline=1 ;;
    --wheels-only) wheels_only=1 ;;
    -h|--help) sed -n '2,19s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) build_args+=("$arg") ;;
  esac
done

if [ "$wheels_only" = 0 ]; then
  command -v docker >/dev/null || die "docker is not installed"
  docker info >/dev/null 2>&1 || die "cannot talk to the Docker engine (is it running, may this user use it?)"
fi
command -v "$PYTHON" >/dev/null || die "$PYTHON not found: the wheelhouse must be made by a Python 3.11 (set PYTHON=...)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || die "$PYTHON is not Python 3.11: the images run 3.11, so the wheels must be for 3.11 (set PYTHON=...)"
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip"

pip() { "$PYTHON" -m pip --disable-pip-version-check --no-input "$@"; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/pagepool-emu-build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# -- 1. the wheelhouse ------------------------------------------------------------------------------
start=$SECONDS
mkdir -p "$WHEELS" "$BUILD_WHEELS"
# Build from a copy of the work tree: an in-tree setuptools build keeps build/lib between runs, and a
# module deleted since would still end up in the wheel.  (tar exits 1 for a file edited while it
# was read: that is no error here.)
mkdir "$tmp/src"
{ tar -C "$ROOT" -cf - --warning=no-file-changed \
    --exclude=./.git --exclude=./.venv --exclude=./venv --exclude=./build --exclude=./dist \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=./.pytest_cache --exclude=./.ruff_cache \
    --exclude=./.hypothesis --exclude=./.mypy_cache \
    --exclude=./emu/ebpf/engine/target --exclude='./emu/ebpf/_engine*.so' . || [ $? = 1 ]; } | tar -C "$tmp/src" -xf -

build_requires=$("$PYTHON" - "$ROOT/pyproject.toml" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f).get("build-system", {}).get("requires", ["setuptools", "wheel"])))
EOF
)
mapfile -t build_requires <<<"$build_requires"

# A fixed zip timestamp makes the wheel depend on the sources only, so an unchanged tree leaves
# docker build's cache valid.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-315532800}
rm -f "$WHEELS"/pagepool_emu-*.whl
if pip wheel --quiet --no-deps --no-index --find-links "$BUILD_WHEELS" -w "$WHEELS" "$tmp/src" 2>/dev/null; then
  say "project wheel built offline"
else
  say "fetching the build backend's wheels (${build_requires[*]}) into ${BUILD_WHEELS#"$ROOT"/}"
  pip download --quiet --only-binary=:all: -d "$BUILD_WHEELS" "${build_requires[@]}"
  pip wheel --quiet --no-deps --no-index --find-links "$BUILD_WHEELS" -w "$WHEELS" "$tmp/src" \
    || die "could not build the project's wheel (see pip's output above)"
fi
project_wheel=$(find "$WHEELS" -maxdepth 1 -name 'pagepool_emu-*.whl' -print -quit)
[ -n "$project_wheel" ] || die "pip built no pagepool_emu wheel"

# Is every runtime dependency (for Python 3.11 on this platform) already in the wheelhouse?
complete() {
  pip install --quiet --dry-run --ignore-installed --no-index --find-links "$WHEELS" "$project_wheel" >/dev/null 2>&1
}
if complete; then
  say "wheelhouse complete: $(find "$WHEELS" -maxdepth 1 -name '*.whl' | wc -l) wheels"
else
  say "downloading the runtime dependencies' wheels into ${WHEELS#"$ROOT"/}"
  # the dependencies as the wheel declares them (Requires-Dist without an extra)
  mapfile -t deps < <("$PYTHON" - "$project_wheel" <<'EOF'
import re, sys, zipfile
from email.parser import Parser
with zipfile.ZipFile(sys.argv[1]) as z:
    name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    meta = Parser().parsestr(z.read(name).decode())
for req in meta.get_all("Requires-Dist") or []:
    if not re.search(r"\bextra\s*==", req):
        print(req)
EOF
)
  pip wheel --quiet -w "$WHEELS" "${deps[@]}"
  complete || die "the wheelhouse still misses dependencies of $project_wheel: try '$PYTHON -m pip install --dry-run --no-index --find-links $WHEELS $project_wheel'"
  say "wheelhouse complete: $(find "$WHEELS" -maxdepth 1 -name '*.whl' | wc -l) wheels"
fi
say "wheelhouse ready in $((SECONDS - start)) s"
[ "$wheels_only" = 0 ] || exit 0

# -- 2. the base image ------------------------------------------------------------------------------
if [ -n "${BASE_IMAGE:-}" ]; then
  base=$BASE_IMAGE
  say "base image: $base (from BASE_IMAGE)"
elif docker image inspect "$OFFICIAL_BASE" >/dev/null 2>&1; then
  base=$OFFICIAL_BASE
  say "base image: $base (present locally)"
elif [ "$offline" != 1 ] && timeout 300 docker pull --quiet "$OFFICIAL_BASE" >/dev/null 2>"$tmp/pull.err"; then
  base=$OFFICIAL_BASE
  say "base image: $base (pulled)"
else
  if [ "$offline" != 1 ]; then
    say "cannot pull $OFFICIAL_BASE ($(head -n 1 "$tmp/pull.err")): using the local base image"
  fi
  "$ROOT/scripts/build-base-image.sh" "$LOCAL_BASE"
  base=$LOCAL_BASE
  say "base image: $base"
fi

# -- 3. the image -----------------------------------------------------------------------------------
# Without the buildx plugin a recent docker CLI refuses BuildKit; the classic builder needs nothing.
if [ -z "${DOCKER_BUILDKIT:-}" ] && ! docker buildx version >/dev/null 2>&1; then
  export DOCKER_BUILDKIT=0
fi
say "docker build --network none --build-arg BASE_IMAGE=$base -t $IMAGE"
start=$SECONDS
previous=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
docker build --network none --build-arg "BASE_IMAGE=$base" -t "$IMAGE" "${build_args[@]}" "$ROOT" \
  >"$tmp/build.log" 2>&1 || { cat "$tmp/build.log" >&2; die "docker build failed"; }
# Every code change makes a new image: drop the one it replaces (unless a container or another tag
# still uses it) and all but the newest first-stage image, so rebuilds do not pile up on the disk.
current=$(docker image inspect -f '{{.Id}}' "$IMAGE")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
  docker image rm "$previous" >/dev/null 2>&1 || true
fi
docker image ls -q --filter label=pagepool-emu.stage=venv --filter dangling=true | tail -n +2 \
  | while read -r id; do docker image rm "$id" >/dev/null 2>&1 || true; done
say "built $IMAGE on $base in $((SECONDS - start)) s ($(docker image inspect -f '{{.Size}}' "$IMAGE" \
  | awk '{ printf "%.0f MB", $1 / 1e6 }'))"
