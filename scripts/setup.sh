#!/usr/bin/env bash
# Set up a fresh machine: Debian packages the tests use where apt is available (dcm2niix, the InVesalius head
# CT, dicom3tools' validators, dcmtk, the Orthanc PACS with its DICOMweb plugin; chromium, on its own so a
# failure there costs nothing else, for the archive's review page in a headless browser), then a venv with the local
# CPU build of PyTorch first (any looser torch spec can pull a several-GB CUDA build), then medsr with its test
# extra. Idempotent: re-running only checks. A failed apt step is reported and setup goes on (those tests skip).
set -euo pipefail
cd "$(dirname "$0")/.."
DEBS="dcm2niix invesalius-examples mricron-data dicom3tools dcmtk orthanc orthanc-dicomweb"
missing() {
  for p in $DEBS; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || return 0; done
  return 1
}
if command -v apt-get >/dev/null && missing; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  # Never let the orthanc package start a system-wide PACS: the tests start their own on 127.0.0.1.
  POLICY=/usr/sbin/policy-rc.d; ADDED_POLICY=""
  if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null && $SUDO chmod +x "$POLICY" && ADDED_POLICY=1
  fi
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq $DEBS >/dev/null; } \
    || echo "setup: apt install of $DEBS failed; the tests needing them will be skipped" >&2
  if [ -n "$ADDED_POLICY" ]; then $SUDO rm -f "$POLICY"; fi
fi
if command -v apt-get >/dev/null && ! dpkg-query -W -f='${Status}' chromium 2>/dev/null | grep -q "ok installed"; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  { DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null 2>&1 \
    || { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null; }; } \
    || echo "setup: apt install of chromium failed; the review page's browser test will be skipped" >&2
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]"
