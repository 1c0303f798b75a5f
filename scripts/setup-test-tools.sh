#!/usr/bin/env bash
# Tools the test suite uses beyond Python packages: Debian's headless Chromium (for the
# docs-page browser test), the PostgreSQL server binaries (tests/test_postgres.py starts a
# throwaway server of its own; no system cluster is needed) and the node packages of the
# supabase-js client test.
# Each is skipped, with a note, where it cannot be installed; the tests that need it then
# skip with a reason.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ ! -x /usr/bin/chromium ]]; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        echo "==> installing Debian chromium (headless browser for the docs test)"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
            || echo "   (chromium could not be installed; the browser test will skip)"
    else
        echo "   (no chromium and not root: the browser test will skip)"
    fi
fi
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        echo "==> installing Debian postgresql (server binaries for the PostgreSQL tests)"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
            || echo "   (postgresql could not be installed; the PostgreSQL tests will skip)"
    else
        echo "   (no PostgreSQL server binaries and not root: the PostgreSQL tests will skip)"
    fi
fi
if [[ -f tests/js/package.json ]] && command -v npm >/dev/null; then
    # Again whenever package-lock.json is newer than what npm last installed.
    if [[ ! -d tests/js/node_modules || tests/js/package-lock.json -nt tests/js/node_modules/.package-lock.json ]]; then
        echo "==> installing node packages for the supabase-js and web app tests"
        (cd tests/js && npm ci --no-audit --no-fund --silent 2>/dev/null || npm install --no-audit --no-fund --silent) \
            || echo "   (npm install failed; the supabase-js test will skip)"
    fi
fi
exit 0
