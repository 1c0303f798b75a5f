#!/usr/bin/env bash
# The full "proof under fire" run (CI runs short versions of the same tests):
#   schema fuzzing with many examples per operation, 20 SIGKILL crash rounds, a 60 s load
#   run with 50 clients, plus the disk-full and hostile-input tests.
# Usage: scripts/fuzz-full.sh [extra pytest args]
# Knobs (environment): MEDMITRA_FUZZ_EXAMPLES (default here 300), MEDMITRA_CRASH_ROUNDS (20),
# MEDMITRA_CRASH_SEED, MEDMITRA_LOAD_CLIENTS (50), MEDMITRA_LOAD_DURATION_S (60).
# The disk-full test mounts a tmpfs and so needs root; without it, it is skipped with a reason.
set -euo pipefail
cd "$(dirname "$0")/.."
export MEDMITRA_FUZZ_EXAMPLES="${MEDMITRA_FUZZ_EXAMPLES:-300}"
export MEDMITRA_CRASH_ROUNDS="${MEDMITRA_CRASH_ROUNDS:-20}"
export MEDMITRA_LOAD_CLIENTS="${MEDMITRA_LOAD_CLIENTS:-50}"
export MEDMITRA_LOAD_DURATION_S="${MEDMITRA_LOAD_DURATION_S:-60}"
exec .venv/bin/python -m pytest -p no:cacheprovider -rs \
    tests/test_fuzz.py tests/test_crash_kill.py tests/test_disk_full.py tests/test_load.py \
    tests/test_hostile_inputs.py "$@"
