#!/usr/bin/env bash
# Install Debian's headless Chromium and its driver for the report's browser test (tests/pipeline/test_report.py).
# Not fatal: where apt cannot install them, the test is skipped and says why.
set -uo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "tools/setup_browser.sh: no apt-get here; the browser test will be skipped"; exit 0
fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null 2>&1 || true
$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
  || echo "tools/setup_browser.sh: could not install chromium/chromium-driver; the browser test will be skipped"
