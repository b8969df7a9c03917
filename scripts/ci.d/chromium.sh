#!/usr/bin/env bash
# Debian's chromium for tests/tracking/test_browser.py, which drives it through Playwright for
# Python with executable_path=/usr/bin/chromium (never `playwright install`: it downloads).
set -euo pipefail
if [ ! -x /usr/bin/chromium ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q chromium
fi
/usr/bin/chromium --version
