#!/usr/bin/env bash
# Refresh the vendored ReDoc bundle under medmitra/static/redoc/ from the npm registry.
#
# The docs pages must work with no network access, so the file is committed; this script is
# only how it gets refreshed (run it by hand, commit the result). Swagger UI needs no
# vendoring: it is served straight from the installed swagger-ui-bundle-v2 wheel.
#
#   scripts/update-docs-assets.sh            # the pinned version below
#   REDOC_VERSION=2.5.5 scripts/update-docs-assets.sh
set -euo pipefail

REDOC_VERSION="${REDOC_VERSION:-2.5.4}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/medmitra/static/redoc"
# The only remote image the bundle inserts at run time (sidebar footer logo).
LOGO_URL='https://cdn.redoc.ly/redoc/logo-mini.svg'

case "$REDOC_VERSION" in
  2.*) ;;
  *) echo "REDOC_VERSION must be a 2.x release (got $REDOC_VERSION)" >&2; exit 2 ;;
esac

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

(cd "$work" && npm pack --silent "redoc@$REDOC_VERSION" >/dev/null)
tar -xzf "$work"/redoc-*.tgz -C "$work"
src="$work/package"
actual_version="$(node -p "require('$src/package.json').version")"

mkdir -p "$DEST"
# An empty src makes the browser fire the image's error event without any request, and
# ReDoc's onError handler then removes the <img>. The source-map comment goes too: the
# map is not vendored (4 MB) and a dangling reference only makes devtools 404.
python3 - "$src/bundles/redoc.standalone.js" "$DEST/redoc.standalone.js" "$LOGO_URL" <<'PY'
import sys
src, dest, logo = sys.argv[1:4]
text = open(src, encoding="utf-8").read()
if text.count(logo) != 1:
    sys.exit(f"expected the ReDoc logo URL exactly once in the bundle, found {text.count(logo)}; "
             "check the bundle by hand before vendoring it")
text = text.replace(f'"{logo}"', '""')
if logo in text:
    sys.exit("logo URL still present after patching (quoted differently?)")
text = text.replace("\n//# sourceMappingURL=redoc.standalone.js.map", "\n")
open(dest, "w", encoding="utf-8").write(text)
PY

cp "$src/LICENSE" "$DEST/LICENSE"
cp "$src/bundles/redoc.standalone.js.LICENSE.txt" "$DEST/redoc.standalone.js.LICENSE.txt"
printf '%s\n' "$actual_version" > "$DEST/VERSION"

echo "vendored redoc $actual_version into ${DEST#"$ROOT"/}"
sha256sum "$DEST/redoc.standalone.js"
