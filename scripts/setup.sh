#!/usr/bin/env bash
# Set up a fresh machine: Debian packages the tests read (dcm2niix, the InVesalius head CT) where apt is
# available, then a venv with the local CPU build of PyTorch first (any looser torch spec can pull a
# several-GB CUDA build), then medsr with its test extra. Idempotent: re-running only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v apt-get >/dev/null && { ! command -v dcm2niix >/dev/null || [ ! -e /usr/share/doc/invesalius-examples/examples/Cranium.inv3 ]; }; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq || true
  $SUDO apt-get install -y -qq dcm2niix invesalius-examples >/dev/null || echo "setup: apt install failed; dcm2niix tests will be skipped" >&2
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]"
