#!/usr/bin/env bash
# Build a minimal Debian bookworm image with Python 3.11 without any container registry:
# debootstrap a root file system from the Debian mirror this machine's apt already uses, then
# `docker import` it.  The result is the offline BASE_IMAGE for the project's Dockerfile.
#
# usage: scripts/build-base-image.sh [--force] [--mirror URL] [TAG]
#   TAG        image to create (default pagepool-emu-base:bookworm)
#   --force    rebuild even if TAG already exists
#   --mirror   Debian mirror to use (default: $DEBIAN_MIRROR, else read from /etc/apt)
#
# Needs root (debootstrap chroots) and debootstrap; on Debian, run as root, it installs debootstrap
# itself.  The temporary root file system is removed on exit, also when something fails.
set -euo pipefail

SUITE=bookworm
INCLUDE=python3,python3-venv,procps
DEFAULT_TAG=pagepool-emu-base:bookworm
# What a container needs that `docker import` does not set (an imported image has no config at all).
IMAGE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() { printf 'build-base-image: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

usage() { sed -n '5,9s/^# \{0,1\}//p' "$0" >&2; }

force=0
mirror=${DEBIAN_MIRROR:-}
tag=
while [ $# -gt 0 ]; do
  case $1 in
    --force) force=1 ;;
    --mirror) [ $# -ge 2 ] || die "--mirror needs a URL"; mirror=$2; shift ;;
    --mirror=*) mirror=${1#--mirror=} ;;
    -h|--help) usage; exit 0 ;;
    -*) usage; die "unknown option: $1" ;;
    *) [ -z "$tag" ] || die "only one TAG, got '$tag' and '$1'"; tag=$1 ;;
  esac
  shift
done
tag=${tag:-$DEFAULT_TAG}

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "cannot talk to the Docker engine (is it running, may this user use it?)"

if [ "$force" = 0 ] && docker image inspect "$tag" >/dev/null 2>&1; then
  say "image $tag already exists (use --force to rebuild it)"
  exit 0
fi

# -- the Debian mirror, from this machine's apt configuration ---------------------------------------
# deb822 files (/etc/apt/sources.list.d/*.sources): the first URI of the first `Types: deb` stanza that
# has a plain release suite (no '-security' / '-updates'); one-line files: the first such `deb` line.
find_mirror() {
  local f uri
  for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    uri=$(awk '
      function flush() {
        if (enabled && types ~ / deb / && plain && uri != "") { print uri; found = 1; exit }
        types = ""; plain = 0; uri = ""; enabled = 1
      }
      BEGIN { enabled = 1 }
      /^[ \t]*#/ { next }
      /^[ \t]*$/ { flush(); next }
      tolower($1) == "types:"   { types = ""; for (i = 2; i <= NF; i++) types = types " " $i; types = types " " }
      tolower($1) == "enabled:" { if (tolower($2) == "no") enabled = 0 }
      tolower($1) == "uris:"    { uri = $2 }
      tolower($1) == "suites:"  { for (i = 2; i <= NF; i++) if ($i !~ /[-\/]/) plain = 1 }
      END { if (!found) flush() }
    ' "$f")
    [ -n "$uri" ] && { echo "$uri"; return 0; }
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -r "$f" ] || continue
    # deb [options] URI SUITE COMPONENTS...
    uri=$(awk '
      $1 != "deb" { next }
      { i = 2; if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ } }
      $(i + 1) !~ /[-\/]/ { print $i; exit }
    ' "$f")
    [ -n "$uri" ] && { echo "$uri"; return 0; }
  done
  return 1
}

if [ -z "$mirror" ]; then
  mirror=$(find_mirror || true)
  # an apt "mirror+file:" or "cdrom:" source is of no use to debootstrap
  case $mirror in
    http://*|https://*|file:/*|ftp://*) ;;
    *) mirror= ;;
  esac
  [ -n "$mirror" ] || die "no Debian mirror found in /etc/apt/sources.list{,.d/}; pass --mirror URL or set DEBIAN_MIRROR"
  say "Debian mirror from the apt configuration: $mirror"
fi

# -- debootstrap ------------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || die "debootstrap needs root: run this script as root (sudo $0 ...)"
if ! command -v debootstrap >/dev/null; then
  if command -v apt-get >/dev/null; then
    say "installing debootstrap with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq debootstrap >/dev/null
  else
    die "debootstrap is not installed: install the 'debootstrap' package (and a Debian archive keyring)"
  fi
fi

workdir=$(mktemp -d "${TMPDIR:-/var/tmp}/pagepool-emu-rootfs.XXXXXX")
rootfs=$workdir/rootfs
cleanup() {
  local status=$? m
  # A debootstrap that failed half-way may leave /proc or /sys mounted inside the tree: unmount those
  # first (deepest first), and never let rm cross into another file system.
  if [ -d "$workdir" ]; then
    awk -v d="$workdir/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
      umount -l "$m" 2>/dev/null || true
    done
    rm -rf --one-file-system "$workdir"
  fi
  [ "$status" = 0 ] || say "failed (exit $status); the temporary root file system was removed"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "debootstrap --variant=minbase --include=$INCLUDE $SUITE (about a minute)"
start=$SECONDS
if ! debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$rootfs" "$mirror" >"$workdir/debootstrap.log" 2>&1; then
  tail -n 30 "$workdir/debootstrap.log" >&2
  [ -f "$rootfs/debootstrap/debootstrap.log" ] && tail -n 30 "$rootfs/debootstrap/debootstrap.log" >&2
  die "debootstrap failed (see above)"
fi
say "debootstrap done in $((SECONDS - start)) s"

# Leave nothing of this machine in the image (Docker provides these files at run time), and no caches.
: >"$rootfs/etc/resolv.conf"
: >"$rootfs/etc/hostname"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log \
  "$rootfs"/tmp/* "$rootfs"/var/tmp/*

say "docker import -> $tag"
tar --numeric-owner -C "$rootfs" -c . | docker import \
  --change "ENV PATH=$IMAGE_PATH" \
  --change "ENV LANG=C.UTF-8" \
  --change 'CMD ["/bin/bash"]' \
  --message "debootstrap --variant=minbase --include=$INCLUDE $SUITE" \
  - "$tag" >/dev/null
say "built $tag ($(docker run --rm "$tag" python3 --version 2>&1)) in $((SECONDS - start)) s"
