#!/usr/bin/env bash
# Install what the tests need and run them: the project (editable, with test, dev, ray, train and docs extras), Debian's
# Chromium for the browser tests (Playwright drives it; its own browser download is not used) and
# Debian's docker-compose, so the compose file is checked by Compose itself (no engine needed).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test,dev,ray,train,docs]"  # ray: about 80 MB of wheels, 20 s
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "Not installed: ${missing[*]} (apt-get install ${missing[*]}): their tests will be skipped." >&2
  fi
fi
# Lint, format and types are checked before the tests (configured in pyproject.toml).
python -m ruff check .
python -m ruff format --check .
python -m mypy  # service/ and training/, as [tool.mypy] in pyproject.toml configures
# The documentation site, built where it leaves nothing behind: --strict fails on a broken link or anchor.
site="$(mktemp -d)"
NO_MKDOCS_2_WARNING=1 python -m mkdocs build --strict --site-dir "$site"  # not --quiet: it hides the warnings --strict counts
rm -rf "$site"
python -m pytest "$@"
