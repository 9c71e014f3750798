#!/usr/bin/env bash
# Install what the tests need and run them: the project (editable, with test extras) and, for the
# browser tests, Debian's Chromium (Playwright drives it; its own browser download is not used).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test]"
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "Chromium is not installed (apt-get install chromium): the browser tests will be skipped." >&2
  fi
fi
python -m pytest "$@"
