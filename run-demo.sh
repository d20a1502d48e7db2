#!/usr/bin/env bash
# Set up (a virtualenv with the project) and run the bundled l2fwd topology: 200,000 packets through
# two emulated CPUs, redirect eth0 -> eth1 with a MAC swap, verified at the sink.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install -qq -e .
./scripts/build-bpf.sh  # the bundled eBPF objects (clang, libbpf-dev installed where missing)
exec "$VENV/bin/emu" run topology/l2fwd.yaml --count "${COUNT:-200000}" -i 1 -e "$@"
