#!/usr/bin/env bash
# Set up (idempotent, with test tools) and run the full test suite. Extra arguments go to
# pytest, e.g. scripts/test.sh -m "not slow" or scripts/test.sh tests/test_api_cases.py
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [[ $rc == 5 ]]; then
    # pytest's "no tests collected": only possible with a selection that matches nothing.
    echo "pytest collected no tests for this selection (exit 5)"
    exit 0
fi
exit $rc
