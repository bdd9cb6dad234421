#!/usr/bin/env bash
# Headless Chromium for the dashboard test (Debian's package). Installed once; a no-op when present.
set -euo pipefail
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium (Debian) for the dashboard browser test..." >&2
  (apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }) \
    || echo "warning: could not install chromium; the dashboard browser test will fail" >&2
else
  echo "warning: chromium not found and cannot be installed here (needs root + apt-get)" >&2
fi
