#!/usr/bin/env bash
# The long versions of the operations tests (issue 12): the backup-while-writing proof runs
# 30 write rounds past the backup instead of 3, then the backup/restore benchmark of 1,000
# cases with 2,000 files. Minutes, not seconds: not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
MEDMITRA_OPS_FULL=1 .venv/bin/python -m pytest -q -s tests/test_backup.py
.venv/bin/python bench/ops_bench.py "$@"
