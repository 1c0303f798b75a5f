#!/usr/bin/env bash
# Build the one-file binary dist/medmitra from build.spec with the project's .venv, then
# print its size and what it is made of. Idempotent; run scripts/setup.sh first.
#
#   scripts/build-binary.sh               build (reusing PyInstaller's caches under build/)
#   scripts/build-binary.sh --clean       build from scratch
#   scripts/build-binary.sh --fast-start  store the archive uncompressed: ~390 MB instead of
#                                         ~150 MB, for less CPU when unpacking (docs/binary.md)
#
# Caches kept between runs on one machine: build/pyinstaller (PyInstaller's work dir: an
# unchanged analysis is not redone), build/stripped (native libraries without debug info),
# PyInstaller's own cache
# (~/.cache/pyinstaller) and pip's. Output: dist/medmitra; build/ and dist/ are git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."

PYINSTALLER_VERSION="6.22.3"
HOOKS_CONTRIB_VERSION="2026.9"
VPY=.venv/bin/python
CLEAN=()
WORK=build/pyinstaller
ZLIB_LEVEL=9   # PyInstaller's default for the one-file archive
for arg in "$@"; do
    case $arg in
        --clean) CLEAN=(--clean) ;;
        # Own work dir: PyInstaller's up-to-date check does not look at the compression level.
        --fast-start) ZLIB_LEVEL=0; WORK=build/pyinstaller-fast ;;
        *) echo "build-binary: unknown option $arg" >&2; exit 2 ;;
    esac
done

if [[ ! -x $VPY ]]; then
    echo "build-binary: no .venv here; run scripts/setup.sh first" >&2
    exit 1
fi
if ! $VPY -c "import PyInstaller" 2>/dev/null; then
    echo "==> installing pyinstaller $PYINSTALLER_VERSION into .venv"
    $VPY -m pip install --quiet --disable-pip-version-check \
        "pyinstaller==$PYINSTALLER_VERSION" "pyinstaller-hooks-contrib==$HOOKS_CONTRIB_VERSION"
fi

echo "==> building dist/medmitra (PyInstaller $($VPY -c 'import PyInstaller; print(PyInstaller.__version__)'))"
started=$(date +%s)
PYINSTALLER_ZLIB_COMPRESSION_LEVEL=$ZLIB_LEVEL \
    $VPY -m PyInstaller --noconfirm "${CLEAN[@]}" --log-level WARN \
    --distpath dist --workpath "$WORK" build.spec
echo "==> built in $(( $(date +%s) - started )) s"

$VPY bench/binary_bench.py --size-only dist/medmitra
