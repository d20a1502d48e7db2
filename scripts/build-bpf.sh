#!/usr/bin/env bash
# Build the bundled eBPF objects (emu/programs/bpf/*.o, build products) with clang; install Debian's clang,
# llvm and libbpf-dev (bpf_helpers.h) first where they are missing (needs root; else says what to install).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v clang >/dev/null || [ ! -e /usr/include/bpf/bpf_helpers.h ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq clang llvm libbpf-dev \
      >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 \
      install -y -qq clang llvm libbpf-dev >/dev/null; }
  else
    echo "build-bpf: clang and libbpf-dev are missing: apt-get install -y clang llvm libbpf-dev" >&2
    exit 1
  fi
fi
# clang 19 (in bookworm) also compiles -mcpu=v4 (signed division, sign-extending loads, bswap) for the
# differential corpus; best effort: without it those cases skip.
if ! command -v clang-19 >/dev/null && [ "$(id -u)" = 0 ] && apt-cache show clang-19 >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq clang-19 >/dev/null || true
fi
exec make -s -C emu/programs/bpf
