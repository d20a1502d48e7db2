#!/usr/bin/env bash
# Set up (a virtualenv with the project and its test extras) and run the whole test suite in parallel.
# Slow multi-process tests are included; Docker tests are too: they skip where no engine runs, except in CI
# (.ci/run sets EMU_REQUIRE_DOCKER=1, so there a missing engine fails the run).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install -qq -e ".[test]"
./scripts/build-bpf.sh  # the bundled eBPF objects (clang, libbpf-dev installed where missing)
"$VENV/bin/python" -m ruff check .
# tests/test_capture.py reads the emulator's pcapng captures back with Debian's tshark: install it when missing
# (answering wireshark-common's question about non-root capture non-interactively).
if ! command -v tshark >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections 2>/dev/null || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tshark >/dev/null 2>&1 \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tshark >/dev/null; }
fi
status=0
"$VENV/bin/python" -m pytest -n auto -q "$@" || status=$?
# pytest exits 5 when it collected nothing: that is a failure of the suite, not a pass.
exit "$status"
