#!/usr/bin/env bash
# Run every benchmark against servers started here; each prints its figures with the ratio
# to its baseline. Needs the set-up done (scripts/setup.sh) and wrk (apt-get install wrk).
#   bench/run.sh            all of them
#   bench/run.sh api        only one: api | analysis | calm | load | binary | icd10 | web
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if ! command -v wrk >/dev/null && [[ $(id -u) == 0 ]]; then
    apt-get install -y -qq wrk >/dev/null 2>&1 || true
fi
which=${1:-all}
run() { echo; echo "=== $1"; shift; "$@"; }
[[ $which == all || $which == api ]] && run "case API (bench/api_bench.py)" $PY bench/api_bench.py
[[ $which == all || $which == analysis ]] && run "analysis (bench/analysis_bench.py)" $PY bench/analysis_bench.py
[[ $which == all || $which == calm ]] && run "API while models think (bench/calm_bench.py)" $PY bench/calm_bench.py
[[ ( $which == all || $which == load ) && -f bench/load.py ]] && run "load (bench/load.py)" $PY bench/load.py
[[ ( $which == all || $which == binary ) && -f bench/binary_bench.py ]] && run "binary (bench/binary_bench.py)" $PY bench/binary_bench.py
[[ $which == all || $which == icd10 ]] && run "ICD-10 table (bench/icd10_bench.py)" $PY bench/icd10_bench.py
[[ $which == all || $which == web ]] && run "web app (bench/web_bench.py)" $PY bench/web_bench.py
exit 0
