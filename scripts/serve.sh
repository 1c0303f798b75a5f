#!/usr/bin/env bash
# Set up (idempotent) and start the server on the embedded defaults:
# http://127.0.0.1:8000, data in ./data, the default model from models/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/medmitra serve "$@"
