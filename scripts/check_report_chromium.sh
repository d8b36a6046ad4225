#!/usr/bin/env bash
# Render a report in headless Chromium and save a screenshot: scripts/check_report_chromium.sh REPORT.html [OUT.png]
# Installs Debian's chromium if missing. The test tests/test_report.py::test_report_renders_in_headless_chromium
# does the same automatically whenever chromium is installed.
set -euo pipefail
report=$(realpath "$1"); out=${2:-${report%.html}_screenshot.png}
if ! command -v chromium >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium
fi
profile=$(mktemp -d)
chromium --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" \
  --screenshot="$out" --window-size=1400,2400 "file://$report" 2>/dev/null
rm -rf "$profile"
echo "screenshot: $out ($(stat -c %s "$out") bytes)"
