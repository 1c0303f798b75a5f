#!/usr/bin/env bash
# Set up everything MedMitra Edge needs in this checkout: the virtual env in .venv, the
# Python dependencies (llama-cpp-python compiles from source the first time, ~10 min on
# 2 cores; pip caches the built wheel, so later set-ups take seconds) and the default
# demonstration model in models/. Idempotent: re-running only fixes what is missing.
#
#   scripts/setup.sh          runtime dependencies
#   scripts/setup.sh --test   also test dependencies (pytest, a headless browser, node packages)
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_TEST=0
[[ "${1:-}" == "--test" ]] && WITH_TEST=1
PY=${PYTHON:-python3}

if [[ ! -x .venv/bin/python ]]; then
    echo "==> creating virtual env .venv"
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
$VPY -m pip install --quiet --upgrade pip wheel setuptools

# llama.cpp is built for the x86-64 AVX2 baseline instead of -march=native, so a binary
# built here also runs on other AVX2 machines. pip reuses its cached wheel when present.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}"

extras=""
[[ $WITH_TEST == 1 ]] && extras="[test]"
if ! $VPY -c "import llama_cpp" 2>/dev/null; then
    echo "==> installing llama-cpp-python (first time on a machine: compiles, ~10 min)"
fi
echo "==> installing dependencies"
$VPY -m pip install --quiet --disable-pip-version-check -e ".${extras}" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
$VPY -c "import llama_cpp, sanic, tortoise" >/dev/null

scripts/fetch-default-model.sh

if [[ $WITH_TEST == 1 ]]; then
    scripts/setup-test-tools.sh
fi
echo "==> set-up complete"
